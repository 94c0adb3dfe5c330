"""`jaxdit parity`: the README's main command, on tiny presets."""

import json

from jaxdit.cli import main


def test_parity_table_float32(capsys):
    assert main(["parity", "--preset", "tiny-flux", "--max-rel", "1e-5"]) == 0
    out = capsys.readouterr().out
    assert "double.0.img.resid_post" in out and "single.2.txt.resid_post" in out and "output" in out


def test_parity_json_bfloat16_kontext(capsys, tmp_path):
    path = tmp_path / "parity.json"
    assert main(["parity", "--preset", "tiny-flux-schnell", "--dtype", "bfloat16", "--kontext", "--batch", "2",
                 "--json", str(path)]) == 0
    report = json.loads(path.read_text())
    assert report["dtype"] == "bfloat16"
    out_row = report["rows"][-1]
    assert out_row["name"] == "output" and 0 < out_row["rel"] < 0.1 and out_row["torch_rel"] > 0
    capsys.readouterr()
    assert main(["parity", "--preset", "tiny-flux", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["output_rel"] <= 1e-5


def test_parity_rejects_bad_sizes(capsys):
    assert main(["parity", "--preset", "tiny-flux", "--height", "50"]) == 2
    assert "multiples of 16" in capsys.readouterr().err


def test_parity_on_a_checkpoint_folder(tmp_path, capsys):
    """`--model DIR` with a pipeline-layout folder (model_index.json + transformer/)."""
    from jaxdit.configs import get_config
    from twins import flux_twin

    flux_twin(get_config("tiny-flux-schnell"), seed=4).save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    assert main(["parity", "--model", str(tmp_path), "--height", "32", "--width", "64", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["output_rel"] <= 1e-5 and len(report["rows"]) == 2 * (2 + 3) + 1


def test_parity_covers_sd3_presets(capsys):
    for preset in ("tiny-sd3", "tiny-sd3.5-large", "tiny-sd3.5-medium"):
        assert main(["parity", "--preset", preset, "--batch", "2", "--json", "--max-rel", "1e-5"]) == 0, preset
        report = json.loads(capsys.readouterr().out)
        assert report["rows"][0]["name"] == "joint.0.img.resid_post" and report["output_rel"] <= 1e-5
    assert main(["parity", "--preset", "tiny-sd3", "--dtype", "bfloat16"]) == 0
    assert "torch bfloat16 rel" in capsys.readouterr().out
