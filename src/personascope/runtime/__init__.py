"""Where the work runs: inference engines (`runtime.engines`) and the Ray worker pool (`runtime.cluster`)."""
