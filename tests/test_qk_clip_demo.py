"""benchmarks/qk_clip_demo.py writes where it is told and says where (issue 13, item 10: it used to
overwrite the committed benchmarks/results/qk_clip_demo.{json,png} without a word)."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("matplotlib")

from benchmarks import qk_clip_demo  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
COMMITTED = [REPO / "benchmarks" / "results" / f"qk_clip_demo.{ext}" for ext in ("json", "png")]


def _digests() -> list[str | None]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() if p.exists() else None for p in COMMITTED]


def test_default_out_is_under_runs_not_the_committed_results():
    out = qk_clip_demo.build_parser().parse_args([]).out
    assert out == REPO / "runs" / "qk_clip_demo" / "qk_clip_demo.json"
    assert out.resolve() not in {p.resolve() for p in COMMITTED}


def test_demo_writes_to_out_prints_where_and_leaves_committed_results(tmp_path, capsys):
    """A 3-step run at tau 0.01 on a tiny model: the JSON and PNG land at --out, both paths are
    printed, the committed files are byte-identical afterwards, and the JSON holds both runs: the
    clipped one clips heads (a fresh tiny model's max logits are ~0.05, above tau 0.01) and the tracking-only
    one (tau 1e30) clips none."""
    before = _digests()
    out = tmp_path / "demo" / "result.json"
    result = qk_clip_demo.main(["--steps", "3", "--tau", "0.01", "--hidden", "32", "--batch", "4", "--seq", "16",
                                "--threads", "1", "--log-every", "100", "--out", str(out)])
    printed = capsys.readouterr().out
    assert out.is_file() and out.with_suffix(".png").is_file()
    assert f"wrote {out} and {out.with_suffix('.png')}" in printed
    assert _digests() == before
    saved = json.loads(out.read_text())
    assert saved["args"]["out"] == str(out) and saved == json.loads(json.dumps(result))
    assert [r["step"] for r in saved["clipped"]["rows"]] == [1, 2, 3]
    assert saved["clipped"]["rows"][0]["max_logit"] > 0.01
    assert all(r["heads_clipped"] > 0 for r in saved["clipped"]["rows"])
    assert all(r["heads_clipped"] == 0 for r in saved["unclipped"]["rows"])
    # --replot redraws the PNG from the JSON at --out
    out.with_suffix(".png").unlink()
    qk_clip_demo.main(["--replot", "--out", str(out)])
    assert out.with_suffix(".png").is_file()


def test_out_must_name_a_json_file(tmp_path):
    with pytest.raises(SystemExit, match="ending in .json"):
        qk_clip_demo.main(["--out", str(tmp_path)])
