"""Job lists: checked before any work, one model load, one inversion per clip, failures kept per
job, resumable, the same on a local Ray, and shards that cover every job once."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import yaml

import tokenflow.batch.runner
from tokenflow.batch import load_jobs, shard
from tokenflow.batch.jobs import parse_shard
from tokenflow.cache import InversionCache
from tokenflow.cli import main
from tokenflow.errors import TokenFlowError


def _write_jobs(folder: Path, jobs: list[dict], **defaults) -> Path:
    path = folder / "jobs.yaml"
    path.write_text(yaml.safe_dump({"defaults": defaults, "jobs": jobs}, sort_keys=False))
    return path


def _frames(folder: Path) -> list[bytes]:
    return [p.read_bytes() for p in sorted((folder / "frames").glob("*.png"))]


def _summary(jobs_file: Path) -> tuple[list[dict], dict]:
    stem = jobs_file.with_name(jobs_file.stem + ".summary")
    with open(stem.with_name(stem.name + ".csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    return rows, json.loads(stem.with_name(stem.name + ".json").read_text())


@pytest.fixture(scope="module")
def settings(tmp_path_factory, tiny_model_dir) -> dict:
    """Defaults of a fast job: 4 frames at 64x64, 2 + 4 steps, blocks of 2, a cache of its own."""
    return dict(
        model=str(tiny_model_dir),
        cache_dir=str(tmp_path_factory.mktemp("cache")),
        inversion_prompt="a wolf",
        frames=4,
        size="64x64",
        steps=2,
        inversion_steps=4,
        block_size=2,
    )


def _three_jobs(data_dir: Path, out: Path) -> list[dict]:
    clip = str(data_dir / "wolf.mp4")
    return [
        {"clip": clip, "prompt": "a fox", "out": str(out / "fox")},
        {"clip": clip, "prompt": "a cat", "block_size": 0, "out": str(out / "cat")},  # bad
        {"clip": clip, "prompts": ["a husky", "a red dog"], "out": str(out / "dogs")},
    ]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data_dir, settings):
    """The 3-job list run once, counting model loads."""
    folder = tmp_path_factory.mktemp("batch")
    jobs = _write_jobs(folder, _three_jobs(data_dir, folder / "out"), **settings)
    loads: list[str] = []
    original = tokenflow.batch.runner.load_job_model

    def counting(options):
        loads.append(options.model)
        return original(options)

    tokenflow.batch.runner.load_job_model = counting
    try:
        code = main(["batch", str(jobs), "--quiet"])
    finally:
        tokenflow.batch.runner.load_job_model = original
    return folder, jobs, code, loads


def test_a_bad_job_fails_alone_and_the_summary_says_so(first_run, settings, capsys):
    folder, jobs, code, loads = first_run
    assert code == 1  # a job failed
    rows, data = _summary(jobs)
    assert [(r["job"], r["prompt"], r["status"]) for r in rows] == [
        ("0", "a fox", "done"),
        ("1", "a cat", "failed"),
        ("2", "a husky", "done"),
        ("2", "a red dog", "done"),
    ]
    assert rows[1]["error"] == "jobs[1]: block_size 0 must be at least 1"
    assert not (folder / "out" / "cat").exists()
    assert data["counts"] == {"done": 3, "skipped": 0, "failed": 1, "not run": 0}
    # the job's prompts are one run: 1 + 2P branch groups, its rows share time and evaluations
    assert rows[2]["out"] == str(folder / "out" / "dogs" / "a-husky")
    assert rows[2]["time_s"] == rows[3]["time_s"] and float(rows[2]["time_s"]) > 0
    editing = (2 + 4) * 2  # 2 keyframes and 4 frames per step, 2 steps
    assert int(rows[0]["unet_evaluations"]) == 4 * 4 + 3 * editing  # its inversion, 3 groups
    assert int(rows[2]["unet_evaluations"]) == 5 * editing  # the clip's inversion was cached
    # one model load, one inversion for the two jobs on the clip
    assert loads == [settings["model"]]
    assert len(InversionCache(settings["cache_dir"]).entries()) == 1
    dog = json.loads((folder / "out" / "dogs" / "a-red-dog" / "run.json").read_text())
    assert dog["inversion_cache"] == "hit" and dog["config"]["prompt"] == "a red dog"


def test_bad_jobs_are_reported_before_any_work(tmp_path, data_dir, settings, capsys, monkeypatch):
    printed_before_work: list[str] = []

    def first_work(*args, **kwargs):
        printed_before_work.append(capsys.readouterr().err)
        raise TokenFlowError("stopped at the first job")

    monkeypatch.setattr(tokenflow.batch.runner, "run_edits", first_work)
    monkeypatch.chdir(tmp_path)
    clip = str(data_dir / "wolf.mp4")
    jobs = _write_jobs(
        tmp_path,
        [
            {"clip": clip, "prompt": "a", "out": "o0"},  # the one good job
            {"clip": clip, "prompt": "a", "out": "o1", "stepz": 3},
            {"prompt": "a", "out": "o2"},
            {"clip": str(data_dir / "missing.mp4"), "prompt": "a", "out": "o3"},
            {"clip": clip, "prompt": "a", "out": "o4", "guidance_scale": "high"},
            {"clip": clip, "prompt": "a", "prompts": ["b"], "out": "o5"},
            {"clip": clip, "prompt": "a", "out": "o0/inner"},
            {"clip": clip, "out": "o7"},
        ],
        **settings,
    )
    assert main(["batch", str(jobs)]) == 1
    assert printed_before_work  # the good job started, after every bad one was reported
    errors = [ln for ln in printed_before_work[0].splitlines() if ln.startswith("error:")]
    assert errors == [
        "error: jobs[1]: unknown setting 'stepz'; did you mean 'steps'?",
        "error: jobs[2]: no clip (the video file or frames folder to edit)",
        f"error: jobs[3]: input {data_dir / 'missing.mp4'} does not exist",
        "error: jobs[4]: guidance_scale is 'high', not a number",
        "error: jobs[5]: give prompt or prompts, not both",
        "error: jobs[6]: out o0/inner is, holds or lies in the output of jobs[0]; give each job"
        " a folder of its own",
        "error: jobs[7]: no prompt given (one text, or a list as prompts)",
    ]
    data = json.loads((tmp_path / "jobs.summary.json").read_text())
    assert data["counts"]["failed"] == 8
    assert data["rows"][0]["error"] == "stopped at the first job"


def test_a_file_that_is_no_job_list_is_one_error(tmp_path, capsys):
    bad = tmp_path / "jobs.yaml"
    bad.write_text("defaults: {steps: 3}\njob: []\n")
    assert main(["batch", str(bad)]) == 2
    assert "needs a `jobs:` list" in capsys.readouterr().err
    bad.write_text("jobs:\n  - clip: [\n")
    assert main(["batch", str(bad)]) == 2
    assert "at line 3, column 1" in capsys.readouterr().err


def test_a_rerun_skips_complete_outputs(first_run, monkeypatch):
    folder, jobs, _, _ = first_run
    before = {name: _frames(folder / "out" / name) for name in ("fox", "dogs/a-husky")}

    def no_work(*args, **kwargs):
        raise AssertionError("a complete output was edited again")

    monkeypatch.setattr(tokenflow.batch.runner, "run_edits", no_work)
    assert main(["batch", str(jobs), "--quiet"]) == 1  # the bad job is still bad
    rows, _ = _summary(jobs)
    assert [r["status"] for r in rows] == ["skipped", "failed", "skipped", "skipped"]
    assert {n: _frames(folder / "out" / n) for n in before} == before


def test_the_same_list_on_a_local_ray_gives_identical_outputs(first_run, data_dir, settings):
    folder, _, _, _ = first_run
    ray_folder = folder / "ray"
    ray_folder.mkdir()
    jobs = _write_jobs(ray_folder, _three_jobs(data_dir, ray_folder / "out"), **settings)
    assert main(["batch", str(jobs), "--ray", "--quiet"]) == 1
    rows, data = _summary(jobs)
    assert [(r["status"], r["unet_evaluations"]) for r in rows] == [
        ("done", str(3 * 6 * 2)),  # the inversion is cached by the run without Ray
        ("failed", ""),
        ("done", str(5 * 6 * 2)),
        ("done", str(5 * 6 * 2)),
    ]
    assert data["ray"] == ""
    for name in ("fox", "dogs/a-husky", "dogs/a-red-dog"):
        assert _frames(ray_folder / "out" / name) == _frames(folder / "out" / name)


def test_shards_cover_every_job_exactly_once(tmp_path, data_dir):
    clips = [str(data_dir / "wolf.mp4"), str(data_dir / "woman-running.mp4")]
    entries = [
        {"clip": clips[i % 2], "prompt": "p", "frames": 4 + i % 3, "out": f"o{i}"}
        for i in range(11)
    ]
    entries[4]["steps"] = -1  # a bad job is in one shard too
    jobs = load_jobs(_write_jobs(tmp_path, entries, inversion_prompt="x"))
    groups = {job.index: job.group_key() for job in jobs.jobs}
    assert len(set(groups.values())) == 6  # 2 clips x 3 frame counts share inversions
    for count in (1, 2, 3, 4, 7):
        shards = [shard(jobs, i, count) for i in range(1, count + 1)]
        indices = [j.index for s in shards for j in [*s.jobs, *s.bad]]
        assert sorted(indices) == list(range(11))  # each job once
        owners: dict[tuple, set[int]] = {}  # jobs sharing a clip's inversion stay together
        for i, part in enumerate(shards):
            for job in part.jobs:
                owners.setdefault(groups[job.index], set()).add(i)
        assert all(len(owner) == 1 for owner in owners.values())
        sizes = [len(s.jobs) for s in shards]
        assert max(sizes) - min(sizes) <= 2  # groups of 1-2 jobs, balanced greedily
    assert [j.index for j in shard(jobs, 2, 3).jobs] == [j.index for j in shard(jobs, 2, 3).jobs]
    with pytest.raises(TokenFlowError, match="1 <= I <= N"):
        parse_shard("4/3")


def test_eval_scores_every_output_into_the_summary(first_run, tmp_path):
    from tokenflow.testing import save_tiny_clip

    folder, jobs, _, _ = first_run
    clip_model = save_tiny_clip(tmp_path / "clip")
    argv = ["batch", str(jobs), "--eval", "--clip-model", str(clip_model), "--flow", "dis"]
    assert main([*argv, "--quiet"]) == 1
    rows, data = _summary(jobs)
    for row in rows:  # outputs made earlier are scored too (all were skipped this time)
        scored = row["status"] == "skipped"
        assert scored == (row["warp_error"] != "") == (row["clip_text_score"] != "")
    assert float(rows[0]["warp_error"]) >= 0 and -1 <= float(rows[0]["clip_text_score"]) <= 1
    assert rows[2]["clip_text_score"] != rows[3]["clip_text_score"]  # each its own prompt
    assert data["rows"][0]["scores"]["frame_consistency_all_pairs"] is not None
