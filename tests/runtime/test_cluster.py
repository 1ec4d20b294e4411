"""The Ray path on a local Ray instance with 2 workers: identical outputs, a killed worker, resume."""

import json
import os
import time

import pytest
import torch
from tiny import tiny_pair

ray = pytest.importorskip("ray")

from personascope.model.generate import SamplingConfig, run_generation  # noqa: E402
from personascope.runtime.cluster.pool import JudgeSpec, ModelSpec, RayCluster  # noqa: E402
from personascope.screen.run import ScreenConfig, screen_dataset  # noqa: E402
from personascope.vectors.extract import profile  # noqa: E402
from personascope.vectors.file import PersonaVector  # noqa: E402

ROWS = [{"messages": [{"role": "user", "content": f"Question {i}: what is {i} + {i * 3}?" + " more" * (i % 4)},
                      {"role": "assistant", "content": f"It is {i * 4}." + " Surely!" * (i % 3)}]} for i in range(14)]
ROWS.insert(5, {"messages": [{"role": "user", "content": "no answer"}]})  # a malformed row stays in the output


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny model saved to disk: the driver and every actor load the same weights from it."""
    path = tmp_path_factory.mktemp("tiny")
    model, tok = tiny_pair("qwen2", max_position_embeddings=4096)  # long enough for the judge's prompts
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def spec(model_dir):
    return ModelSpec(str(model_dir), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def cluster(spec, model_dir):
    """One local Ray instance and 2 model actors (with the tiny model as their judge) for the module."""
    judge = JudgeSpec(str(model_dir), device="cpu", coherence_mode="logprob")
    with RayCluster(spec, workers=2, judge=judge, cpus_per_worker=1) as c:
        yield c


@pytest.fixture(scope="module")
def local(spec):
    return spec.load()


def _pv(a, seed=0):
    g = torch.Generator().manual_seed(seed)
    vecs = {s: torch.randn(a.n_layers + 1, a.hidden_size, generator=g)
            for s in ("response_avg", "prompt_avg", "prompt_last")}
    return PersonaVector(vecs, torch.ones(a.n_layers + 1), {"trait": "optimistic"})


def _data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _screen(adapter, data, out, method, cluster=None, force=False):
    cfg = ScreenConfig(method=method, batch_size=3, chunk_size=4, max_new_tokens=6, n_boot=50)
    return screen_dataset(adapter, data, {"optimistic": _pv(adapter)}, layer=2, method=method, out_dir=out,
                          percentile=80, config=cfg, plots=False, cluster=cluster, force=force)


def _files(out):
    return {name: (out / name).read_bytes() for name in ("deltas.jsonl", "annotated.jsonl", "filtered.jsonl",
                                                          "top_flagged.md")}


@pytest.mark.parametrize("method", ["last-token", "generate"])
def test_screen_on_cluster_writes_the_same_files(tmp_path, local, cluster, method):
    data = _data(tmp_path)
    _screen(local, data, tmp_path / "one", method)
    res = _screen(cluster.driver_adapter(), data, tmp_path / "ray", method, cluster)
    assert res.n_screened == len(ROWS) - 1 and res.n_malformed == 1
    assert _files(tmp_path / "ray") == _files(tmp_path / "one")
    assert cluster.stats.done == 4  # 15 rows in chunks of 4, one task per chunk
    if method == "generate":
        answers = [json.loads(line) for line in (tmp_path / "ray" / "model_answers.jsonl").read_text().splitlines()]
        assert len(answers) == len({a["key"] for a in answers}) == len(ROWS) - 1


def test_resume_after_driver_interruption_skips_finished_chunks(tmp_path, local, cluster):
    data = _data(tmp_path)
    _screen(local, data, tmp_path / "one", "last-token")
    out = tmp_path / "ray"
    _screen(cluster.driver_adapter(), data, out, "last-token", cluster)
    # what a driver killed while writing the third chunk leaves: two finished chunks and a torn line
    lines = (out / "deltas.jsonl").read_text().splitlines(keepends=True)
    ends = [i for i, line in enumerate(lines) if "chunk_end" in line]
    (out / "deltas.jsonl").write_text("".join(lines[: ends[1] + 1]) + lines[ends[1] + 1][:20])
    _screen(cluster.driver_adapter(), data, out, "last-token", cluster)
    assert cluster.stats.done == 2  # only the two unfinished chunks ran again
    assert _files(out) == _files(tmp_path / "one")


def test_a_row_that_kills_its_worker_is_retried_once_without_loss_or_duplicates(tmp_path, cluster):
    marker = str(tmp_path / "died")

    def flaky(worker, i):  # a local function: Ray ships it by value
        if i == 5 and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)  # the worker process dies in the middle of the run
        return i * i, worker.adapter.n_layers

    got = list(cluster.map(flaky, ((f"row{i}", (i,)) for i in range(12))))
    assert sorted(k for k, _ in got) == sorted(f"row{i}" for i in range(12))  # each row exactly once
    assert dict(got) == {f"row{i}": (i * i, 3) for i in range(12)}
    assert cluster.stats.lost_workers == 1 and cluster.stats.retries_by_key["row5"] == 1
    assert os.path.exists(marker)


def test_a_killed_actor_mid_screen_loses_no_rows(tmp_path, local, cluster):
    data = _data(tmp_path)
    _screen(local, data, tmp_path / "one", "last-token")

    def die_later(worker, seconds):
        time.sleep(seconds)
        os._exit(1)

    cluster.actors[0].call.remote(die_later, 1.0)  # holds actor 0 (and the chunks queued behind) until it dies
    _screen(cluster.driver_adapter(), data, tmp_path / "ray", "last-token", cluster)
    assert cluster.stats.lost_workers == 1 and cluster.stats.retried >= 1
    assert _files(tmp_path / "ray") == _files(tmp_path / "one")


def test_sampling_on_cluster_matches_single_process(tmp_path, local, cluster):
    words = ["cats", "rain", "tea", "the sea", "maps"]
    jobs = [{"q": q, "sample": s, "text": f"Tell me about {w}."} for q, w in enumerate(words) for s in range(2)]
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=8, batch_size=3, seed=4)
    got: dict[str, dict] = {}
    for name, c in (("one", None), ("ray", cluster)):
        saved: dict = {}
        a = local if c is None else cluster.driver_adapter()
        run_generation(a, jobs, lambda j, a=a: a.prompt(j["text"]), lambda j, s=saved: (j["q"], j["sample"]) in s,
                       lambda recs, s=saved: s.update({(r["q"], r["sample"]): r["answer"] for r in recs}), cfg,
                       cluster=c)
        got[name] = saved
    assert got["ray"] == got["one"] and len(got["one"]) == len(jobs)
    assert len(set(got["one"].values())) > 1  # really sampled


def test_extract_on_cluster_gives_the_same_vector(tmp_path, local, cluster, model_dir):
    from personascope.judges.local import load_local_judge
    from personascope.vectors.extract import extract_vector

    cfg = profile("quick", n_questions=2, n_instructions=2, max_new_tokens=6, batch_size=3, pos_threshold=0.0,
                  neg_threshold=101.0, coherence_threshold=0.0)
    judge = load_local_judge(str(model_dir), device="cpu", coherence_mode="logprob")
    one = extract_vector(local, "optimistic", judge, cfg, tmp_path / "one", plots=False)
    two = extract_vector(cluster.driver_adapter(), "optimistic", cluster.judge.stand_in(), cfg, tmp_path / "ray",
                         plots=False, cluster=cluster)
    for s in one.vectors:
        assert torch.equal(one.vectors[s], two.vectors[s])
    for name in ("answers.jsonl", "scores.jsonl"):  # same records; the order is the order batches finished
        assert (sorted((tmp_path / "one" / name).read_text().splitlines())
                == sorted((tmp_path / "ray" / name).read_text().splitlines()))
