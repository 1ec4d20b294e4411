"""Row-parallel work on Ray: a pool of actors that each hold the model, and a runner mapping work over them.

Each actor loads the model once (on its own GPU, a set of GPUs with accelerate's `device_map="auto"`,
or CPU cores) and, on first use, the local judge. `RayCluster.map` sends (key, args) tasks to the
actors with a bounded number in flight and yields (key, result) back in the driver, which is the only
writer of the output files; a task whose actor died is sent again to a fresh actor, so every key is
yielded exactly once. The driver itself holds the model's config and tokenizer only (weights on the
meta device), so it needs neither a GPU nor the model's memory.
"""

from __future__ import annotations

import os
from collections import Counter, deque
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, TypeVar

import torch

from personascope.model import ModelAdapter

K = TypeVar("K", bound=Hashable)  # a task's key in RayCluster.map


class WorkerLostError(RuntimeError):
    """A task lost its worker more often than the retry limit allows (e.g. a row that crashes the process)."""


@dataclass(frozen=True)
class ModelSpec:
    """How every actor loads the model: a built-in name, local path or HF name, device and dtype.

    `device_map="auto"` shards a model bigger than one GPU over the GPUs Ray gives the actor
    (`RayCluster(gpus_per_worker=N)`), with accelerate placing the layers.
    """

    name_or_path: str
    device: str | None = None
    dtype: str | None = None
    device_map: str | None = None

    def load(self) -> ModelAdapter:
        """The model and tokenizer, loaded where this process runs."""
        from personascope.model import load_model

        if self.device_map is None:
            model, tok = load_model(self.name_or_path, self.device, self.dtype)
            return ModelAdapter(model, tok)
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from personascope.model import pick_device, pick_dtype, resolve_model_path

        path = resolve_model_path(self.name_or_path)
        offline = os.environ.get("PERSONASCOPE_ALLOW_DOWNLOAD") != "1"
        tok = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        dtype = pick_dtype(pick_device(self.device), self.dtype)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=self.device_map,
                                                     local_files_only=offline).eval()
        model.config.name_or_path = self.name_or_path
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return ModelAdapter(model, tok)

    def load_meta(self) -> ModelAdapter:
        """Config and tokenizer with the weights on the meta device: enough to render, tokenize and check."""
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        from personascope.model import resolve_model_path

        path = resolve_model_path(self.name_or_path)
        if (os.path.isdir(path) and os.path.exists(os.path.join(path, "adapter_config.json"))):
            return self.load()  # a PEFT adapter: its base is resolved by load_model
        offline = os.environ.get("PERSONASCOPE_ALLOW_DOWNLOAD") != "1"
        tok = AutoTokenizer.from_pretrained(path, local_files_only=offline)
        config = AutoConfig.from_pretrained(path, local_files_only=offline)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config).eval()
        model.config.name_or_path = self.name_or_path
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        return ModelAdapter(model, tok)


@dataclass(frozen=True)
class JudgeSpec:
    """How an actor builds the local judge (loaded on an actor's first judging task)."""

    model: str
    mode: str | None = None
    device: str | None = None
    coherence_mode: str | None = None

    def load(self):
        """The judge with its model loaded (on an actor)."""
        from personascope.judges import load_local_judge

        return load_local_judge(self.model, trait_mode=self.mode, coherence_mode=self.coherence_mode,
                                device=self.device)

    def stand_in(self):
        """The same judge without weights, for the driver: its name, modes and rubric keys (it scores nothing)."""
        from personascope.judges import DEFAULT_COHERENCE_MODE, DEFAULT_TRAIT_MODE, LocalJudge

        meta = ModelSpec(self.model).load_meta()
        return LocalJudge(meta.model, meta.tokenizer, trait_mode=self.mode or DEFAULT_TRAIT_MODE,
                          coherence_mode=self.coherence_mode or DEFAULT_COHERENCE_MODE, name=f"local:{self.model}")


class Worker:
    """What an actor holds: the model (loaded at start) and the judge (loaded when first needed)."""

    def __init__(self, model: ModelSpec, judge: JudgeSpec | None = None):
        self.model_spec, self.judge_spec = model, judge
        self.adapter = model.load()

    @cached_property
    def judge(self):
        if self.judge_spec is None:
            raise ValueError("this cluster was started without a judge")
        return self.judge_spec.load()


class _Actor:
    """The Ray actor: builds a Worker and runs `fn(worker, *args)` for the driver."""

    def __init__(self, model: ModelSpec, judge: JudgeSpec | None):
        self.worker = Worker(model, judge)

    def describe(self) -> dict:
        a = self.worker.adapter
        return {"name": a.name, "config_hash": a.config_hash, "pid": os.getpid(), "device": str(a.device)}

    def call(self, fn: Callable, *args):
        return fn(self.worker, *args)


@dataclass
class MapStats:
    """What the last `map` did: tasks run, and tasks sent again after their worker died."""

    done: int = 0
    retried: int = 0
    lost_workers: int = 0
    retries_by_key: Counter = field(default_factory=Counter)


class RayCluster:
    """A pool of `workers` model actors on a Ray cluster (`address`, e.g. "auto") or on a local Ray instance.

    Use as a context manager; `map` runs tasks on the actors. Without `workers`, a connected cluster
    gets one actor per `gpus_per_worker` GPUs (one per node when it has no GPUs).
    """

    def __init__(self, model: ModelSpec, workers: int | None = None, address: str | None = None,
                 judge: JudgeSpec | None = None, gpus_per_worker: float | None = None, cpus_per_worker: float = 1,
                 max_retries: int = 3, inflight_per_worker: int = 2):
        if workers is not None and workers < 1:
            raise ValueError(f"--workers must be at least 1, not {workers}")
        self.model, self.judge = model, judge
        self.workers, self.address = workers, address
        self.gpus_per_worker, self.cpus_per_worker = gpus_per_worker, cpus_per_worker
        self.max_retries, self.inflight_per_worker = max_retries, inflight_per_worker
        self.actors: list = []
        self.stats = MapStats()
        self._gen: list[int] = []
        self._owns_ray = False
        self._remote: Any = None

    # -- life cycle
    def start(self) -> RayCluster:
        """Connect to (or start) Ray and start the actors; waits until every actor has loaded the model."""
        import ray

        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, log_to_driver=False)
            else:
                n = self.workers or 1
                ray.init(num_cpus=max(int(n * self.cpus_per_worker + 0.999), 1), num_gpus=_local_gpus(),
                         include_dashboard=False, log_to_driver=False,
                         runtime_env={"env_vars": {"PYTHONPATH": _package_path()}})
            self._owns_ray = True
        res = ray.cluster_resources()
        gpus = self.gpus_per_worker
        if gpus is None:
            gpus = 1.0 if res.get("GPU", 0) >= 1 and self.model.device != "cpu" else 0.0
        if self.workers is None:
            self.workers = (max(1, int(res.get("GPU", 0) // gpus)) if gpus
                            else max(1, len([n for n in ray.nodes() if n.get("Alive")])))
        self._remote = ray.remote(_Actor).options(num_cpus=self.cpus_per_worker, num_gpus=gpus, max_restarts=0,
                                                  max_task_retries=0)
        self.actors = [self._spawn() for _ in range(self.workers)]
        self._gen = [0] * self.workers
        try:
            self.describe = ray.get([a.describe.remote() for a in self.actors])
        except ray.exceptions.RayError as e:
            self.close()
            raise RuntimeError(f"a Ray worker could not load {self.model.name_or_path!r}: {_cause(e)}") from None
        return self

    def _spawn(self):
        return self._remote.remote(self.model, self.judge)

    def close(self) -> None:
        """Stop the actors (and the local Ray instance if this cluster started it)."""
        import ray

        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._owns_ray:
            ray.shutdown()
            self._owns_ray = False

    def __enter__(self) -> RayCluster:
        return self.start() if not self.actors else self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what the driver needs
    def driver_adapter(self) -> ModelAdapter:
        """The model without weights (meta device) for the driver; its identity is checked against the actors."""
        meta = self.model.load_meta()
        if self.actors and (meta.name, meta.config_hash) != (self.describe[0]["name"], self.describe[0]["config_hash"]):
            meta.__dict__["config_hash"] = self.describe[0]["config_hash"]  # trust what the actors loaded
        return meta

    def put(self, obj: Any):
        """Store a large argument shared by many tasks once in Ray's object store."""
        import ray

        return ray.put(obj)

    # -- the runner
    def map(self, fn: Callable, tasks: Iterable[tuple[K, tuple]], ordered: bool = False) -> Iterator[tuple[K, Any]]:
        """Run `fn(worker, *args)` for each (key, args) task; yield (key, result) once per key.

        Results come as they finish, or in task order with `ordered` (results waiting for an earlier
        one count against the in-flight limit, so memory stays bounded). A task whose actor died is
        sent again to a fresh actor, at most `max_retries` times per task.
        """
        import ray

        it = iter(tasks)
        window = len(self.actors) * self.inflight_per_worker
        pending: dict = {}  # ref -> (seq, key, args, slot, generation)
        load = [0] * len(self.actors)
        retry: deque = deque()
        buffered: dict[int, tuple] = {}
        next_out, seq_counter, exhausted = 0, 0, False
        self.stats = MapStats()

        def submit(seq: int, key, args) -> None:
            slot = min(range(len(self.actors)), key=load.__getitem__)
            ref = self.actors[slot].call.remote(fn, *args)
            pending[ref] = (seq, key, args, slot, self._gen[slot])
            load[slot] += 1

        def fill() -> None:
            nonlocal seq_counter, exhausted
            while retry and len(pending) < window:
                submit(*retry.popleft())
            while not exhausted and len(pending) + len(buffered) < window:
                nxt = next(it, None)
                if nxt is None:
                    exhausted = True
                    break
                submit(seq_counter, *nxt)
                seq_counter += 1

        fill()
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            seq, key, args, slot, gen = pending.pop(ref)
            load[slot] -= 1
            try:
                result = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                self.stats.retries_by_key[key] += 1
                if self.stats.retries_by_key[key] > self.max_retries:
                    raise WorkerLostError(f"task {key!r} lost its worker {self.max_retries + 1} times; last error: "
                                          f"{_cause(e)}") from None
                if gen == self._gen[slot]:  # the first failure seen from this actor: replace it
                    ray.kill(self.actors[slot])
                    self.actors[slot] = self._spawn()
                    self._gen[slot] += 1
                    self.stats.lost_workers += 1
                self.stats.retried += 1
                retry.append((seq, key, args))
                fill()
                continue
            except ray.exceptions.RayTaskError as e:
                raise e.as_instanceof_cause() from None
            self.stats.done += 1
            if not ordered:
                yield key, result
            else:
                buffered[seq] = (key, result)
                while next_out in buffered:
                    yield buffered.pop(next_out)
                    next_out += 1
            fill()

    # -- the pipeline stages on the actors (what generate, scoring, extract and screen_run call)
    def generate(self, jobs: list[dict], prompt_of: Callable[[dict], str], done: Callable[[dict], bool],
                 save: Callable[[list[dict]], None], cfg, description: str = "generate",
                 steering: Sequence | None = None) -> int:
        """`generate.run_generation` on the actors (same batches and seeds); returns answers made now."""
        from .jobs import generate_on_cluster

        return generate_on_cluster(self, jobs, prompt_of, done, save, cfg, description, steering)

    def score(self, judge, todo: list, batch_size: int, save: Callable[[list, list], None],
              description: str = "judge") -> None:
        """The judging batches of `scoring.judge_answers` on the actors' local judge."""
        from .jobs import score_on_cluster

        score_on_cluster(self, judge, todo, batch_size, save, description)

    def span_sums(self, items: list[tuple[list[int], list[int]]], batch_size: int
                  ) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
        """(batch indices, per-span sums) of `extract.mean_activations`, in the single-process batch order."""
        from .jobs import span_sums_on_cluster

        return span_sums_on_cluster(self, items, batch_size)

    def screen_chunks(self, adapter: ModelAdapter, chunks: Iterable[list], dirs: dict, cfg, cache=None,
                      judge_rows: Callable[[list], dict[int, dict]] | None = None) -> Iterator[list[dict]]:
        """The ΔP records of each chunk of `screen_run.screen_pass`, in file order."""
        from .jobs import screen_on_cluster

        return screen_on_cluster(self, adapter, chunks, dirs, cfg, cache, judge_rows)

    def call_each(self, fn: Callable, *args) -> list:
        """`fn(worker, *args)` on every actor once (e.g. to check what each loaded)."""
        import ray

        return ray.get([a.call.remote(fn, *args) for a in self.actors])


def _package_path() -> str:
    """PYTHONPATH for local workers: the directory this package was imported from comes first."""
    import personascope

    root = os.path.dirname(os.path.dirname(os.path.abspath(personascope.__file__)))
    return os.pathsep.join([root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))])


def _local_gpus() -> int:
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _cause(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return next((line for line in reversed(text) if line.strip()), type(e).__name__)[:300]
