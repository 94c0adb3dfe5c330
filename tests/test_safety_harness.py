"""The real-model safety harness: NudeNet adapter on real photos, CSV runs on a tiny model, erase rates."""

import json

import numpy as np
import pytest
import skimage.data

from jaxdit.cli import main
from jaxdit.safety.harness import erase_rates, read_prompts_csv
from jaxdit.safety.nudity import NudityDetector, NudityRule


def test_detector_adapter_on_real_photos():
    """scikit-image ships real photographs: a face is found, nothing exposed; a rule over the face class
    flags the image, proving the class/threshold logic reads real detections."""
    photo = skimage.data.astronaut()
    det = NudityDetector()
    result = det.detect([photo, skimage.data.coffee()])
    faces = [d for d in result[0]["detections"] if d["class"] == "FACE_FEMALE"]
    assert faces and faces[0]["score"] > 0.5 and not result[0]["unsafe"]
    assert result[1]["detections"] == [] and not result[1]["unsafe"]
    strict = NudityDetector(NudityRule(classes=("FACE_FEMALE",), threshold=0.5)).detect([photo])[0]
    assert strict["unsafe"] and strict["unsafe_classes"] == ["FACE_FEMALE"]
    assert "> 0.5" in NudityRule(threshold=0.5).describe()
    with pytest.raises(ValueError, match="RGB"):
        det.detect([np.zeros((4, 4))])


def test_csv_reading_errors(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,seed\nhello,1\n")
    with pytest.raises(ValueError, match="'prompt' column"):
        read_prompts_csv(bad)
    seeds = tmp_path / "seeds.csv"
    seeds.write_text("prompt,evaluation_seed\na,1\nb,x\n")
    with pytest.raises(ValueError, match="row 3"):
        read_prompts_csv(seeds)


def test_erase_rates():
    base = [{"index": i, "seed": i, "unsafe": u} for i, u in enumerate([1, 1, 0, 1])]
    method = [{"index": i, "seed": i, "unsafe": u} for i, u in enumerate([0, 1, 1, 0])]
    r = erase_rates(base, method)
    assert r["erase_rate_aggregate"] == pytest.approx(1 - 2 / 3)
    assert r["erase_rate_per_sample"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="same prompts"):
        erase_rates(base, method[:3])


def test_eval_and_compare_on_a_tiny_model(tmp_path, capsys):
    from pipeline_twins import flux_pipeline_folder

    folder = tmp_path / "pipe"
    flux_pipeline_folder(folder, guidance=True, seed=31)
    prompts = tmp_path / "i2p.csv"
    prompts.write_text("prompt,evaluation_seed,evaluation_guidance,categories\n"
                       "a cat on a chair,5,3.5,none\n\"two dogs, snow\",7,7.0,none\n")
    args = ["safety", "eval", "--model", str(folder), "--prompts", str(prompts), "--steps", "2", "--size", "32",
            "--csv-guidance"]
    assert main([*args, "--out", str(tmp_path / "base")]) == 0
    summary = json.loads((tmp_path / "base" / "summary.json").read_text())
    assert summary["n"] == 2 and summary["unsafe"] == 0 and "scores > 0.6" in summary["rule"]
    lines = [json.loads(line) for line in (tmp_path / "base" / "results.jsonl").read_text().splitlines()]
    assert [r["seed"] for r in lines] == [5, 7] and lines[1]["row"]["prompt"] == "two dogs, snow"
    assert len(list((tmp_path / "base" / "images").glob("*.png"))) == 2
    assert main([*args, "--out", str(tmp_path / "again")]) == 0
    capsys.readouterr()
    assert main(["safety", "compare", str(tmp_path / "base"), str(tmp_path / "again")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["unsafe_base"] == 0 and report["erase_rate_aggregate"] is None
    assert main([*args, "--out", str(tmp_path / "x"), "--method", "uvr"]) == 2
    assert "--uvr BANK" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_eval_method_safedig_needs_dictionaries(tmp_path, capsys):
    (tmp_path / "p.csv").write_text("prompt\na cat\n")
    assert main(["safety", "eval", "--model", str(tmp_path), "--prompts", str(tmp_path / "p.csv"), "--method",
                 "safedig", "--out", str(tmp_path / "run")]) == 2
    assert "--dictionary" in capsys.readouterr().err
