"""experiments/: one TOML file per measured run, re-run with `--config FILE` (`jaxdit.experiment`).

Every file is parsed by its entry's real parser (nothing runs), the toy-world training files are the
`hyper` of the weights they produced, the command line overrides a file, and a bad file is refused in
one line naming it and the key at fault before any work."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from jaxdit import cli, experiment
from jaxdit.toyworld import cli as toyworld_cli

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "experiments").rglob("*.toml"))
PHASE3 = "experiments/toyworld/phase3_pairs.toml"
# options that do not change the weights a training run produces
NOT_TRAINING = {"run", "export", "eval_every", "eval_n", "detector_weights", "no_progress"}


class _Parsed(Exception):
    pass


def _bench(script: str):
    path = ROOT / script
    spec = importlib.util.spec_from_file_location(f"_experiments_{path.stem}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def _bench_args(monkeypatch, script: str, argv):
    """The namespace `benchmarks/...py`'s main parses from argv (its own parser and the shared call), stopping
    before any work."""
    mod = _bench(script)

    def parsed(parser, argv, entry):
        raise _Parsed(experiment.parse_args(parser, argv, entry))

    monkeypatch.setattr(mod, "parse_args", parsed)
    with pytest.raises(_Parsed) as e:
        mod.main(argv)
    return e.value.args[0]


def _jaxdit_args(argv):
    """The namespace `jaxdit.cli.main` parses from argv (the same two calls), nothing run."""
    parser = cli.build_parser()
    return parser.parse_args(experiment.expand(parser, argv, "jaxdit"))


def _args(monkeypatch, rel: str, extra=()):
    exp = experiment.load(ROOT / rel)
    if exp.command.startswith("jaxdit "):
        return _jaxdit_args(["--config", str(ROOT / rel), *extra])
    return _bench_args(monkeypatch, exp.command, ["--config", str(ROOT / rel), *extra])


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def test_there_are_experiments():
    names = {_rel(f) for f in FILES}
    assert {PHASE3, "experiments/toyworld/phase1_base.toml", "experiments/toyworld/phase2_binding.toml",
            "experiments/toyworld/detector.toml", "experiments/benchmarks/toyworld_safety.toml",
            "experiments/benchmarks/toyworld_safedig.toml"} <= names


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_each_file_is_accepted_by_its_entrys_parser(monkeypatch, path):
    exp = experiment.load(path)
    args = _args(monkeypatch, _rel(path))
    assert exp.description and exp.args
    if exp.command.startswith("jaxdit "):
        words = exp.command.split()[1:]
        assert args.experiment == str(path) and args.command == words[0]
        assert getattr(args, f"{words[0]}_command", None) == (words[1] if len(words) > 1 else None)
    else:
        assert (ROOT / exp.command).is_file() and args.config == str(path)
    for key, value in exp.args.items():
        assert getattr(args, key) == value, key


@pytest.mark.parametrize("path", FILES, ids=_rel)
def test_each_file_is_referenced_where_its_results_are(path):
    exp = experiment.load(path)
    for name in exp.recorded_in:
        assert (ROOT / name).is_file(), f"{_rel(path)}: recorded_in {name}: no such file"
    docs = ["benchmarks/RESULTS.md", *[n for n in exp.recorded_in if n.endswith(".md")]]
    assert any(_rel(path) in (ROOT / d).read_text() for d in docs), f"{_rel(path)} named in none of {docs}"
    assert _rel(path).removeprefix("experiments/") in (ROOT / "experiments" / "README.md").read_text()


def test_training_files_are_the_hyper_of_the_committed_weights(monkeypatch):
    records = {}
    for path in FILES:
        exp = experiment.load(path)
        for name in exp.recorded_in:
            if name.endswith("training.json"):
                records[name] = exp
                hyper = json.loads((ROOT / name).read_text())["hyper"]
                assert {k: exp.args[k] for k in hyper if k in exp.args} == hyper, name
                assert set(exp.args) - set(hyper) <= NOT_TRAINING, f"{_rel(path)} sets a value {name} lacks"
                args = _args(monkeypatch, _rel(path))
                assert {k: getattr(args, k) for k in hyper} == hyper
                assert (args.command, args.toyworld_command, args.detector) == ("toyworld", "train", False)
                assert Path(args.export) == Path(name).parent  # it writes the weights it is the record of
    assert set(records) == {"toyworld/weights_base/training.json", "toyworld/weights_binding/training.json",
                            "toyworld/weights/training.json", "toyworld/weights_attention/training.json"}


def test_detector_file_is_its_record(monkeypatch):
    rel = "experiments/toyworld/detector.toml"
    record = json.loads((ROOT / "toyworld/weights/detector/detector.json").read_text())
    assert "toyworld/weights/detector/detector.json" in experiment.load(ROOT / rel).recorded_in
    args = _args(monkeypatch, rel)
    assert args.detector and (args.seed, args.steps) == (record["seed"], record["steps"])
    assert Path(args.export) == Path("toyworld/weights")


def test_jaxdit_config_then_overrides(monkeypatch, tmp_path):
    """`jaxdit --config FILE --steps 10 --run DIR` runs the file's command with the overrides."""
    seen = []
    monkeypatch.setattr(toyworld_cli, "_train", lambda args: seen.append(args) or 0)
    assert cli.main(["--config", str(ROOT / PHASE3), "--steps", "10", "--run", str(tmp_path)]) == 0
    (args,) = seen
    assert (args.steps, args.run) == (10, str(tmp_path))
    assert (args.seed, args.t2i_batch, args.lr, args.mix, args.eval_every) == (2, 40, 0.0004, "pairs", 600)
    assert args.experiment == str(ROOT / PHASE3)


def test_benchmark_config_then_overrides(monkeypatch):
    rel = "experiments/benchmarks/toyworld_safety.toml"
    args = _args(monkeypatch, rel, ["--n", "2", "--out", "elsewhere"])
    assert (args.n, args.out, args.calibration_n, args.suite_seed) == (2, "elsewhere", 16, 20261203)
    # the file's options stand where --config does: a flag before it is overridden by the file
    before = _bench_args(monkeypatch, "benchmarks/toyworld_safety.py", ["--n", "2", "--config", str(ROOT / rel)])
    assert before.n == 64
    # without --config the script parses as before
    plain = _bench_args(monkeypatch, "benchmarks/toyworld_safety.py", ["--n", "3"])
    assert (plain.n, plain.config, plain.suite_seed) == (3, None, None)


def test_lists_and_flags(monkeypatch, tmp_path):
    """A list gives a repeatable option once per value; true gives a flag, false leaves it out."""
    path = tmp_path / "shapes.toml"
    path.write_text('command = "benchmarks/sae_throughput.py"\ndescription = "two shapes"\n[args]\n'
                    'shape = ["16:4:4:64", "8:4:2:32"]\nno_sparsify = true\ncrossover = false\nblock_s = 0.5\n')
    mod = _bench("benchmarks/sae_throughput.py")
    args = _bench_args(monkeypatch, "benchmarks/sae_throughput.py", ["--config", str(path)])
    assert [s.label() for s in args.shape] == [mod.Shape.parse(t).label() for t in ("16:4:4:64", "8:4:2:32")]
    assert (args.no_sparsify, args.crossover, args.block_s) == (True, False, 0.5)


BAD = {  # file text (None: no file) -> what the one line must name besides the file
    "missing": (None, "no such experiment file"),
    "bad_toml": ('command = "jaxdit toyworld train"\n[args\nsteps = 3\n', "not valid TOML"),
    "unknown_key": ('command = "jaxdit toyworld train"\ndescription = "d"\n[args]\nstepz = 3\n', "args.stepz"),
    "unknown_top_key": ('comand = "jaxdit toyworld train"\ndescription = "d"\n', "comand"),
    "no_description": ('command = "jaxdit toyworld train"\n[args]\nsteps = 3\n', "description"),
    "other_entry": ('command = "benchmarks/toyworld_safety.py"\ndescription = "d"\n[args]\nn = 3\n', "command"),
    "no_such_subcommand": ('command = "jaxdit toyworld trian"\ndescription = "d"\n', "command"),
    "incomplete_subcommand": ('command = "jaxdit toyworld"\ndescription = "d"\n', "command"),
    "wrong_type": ('command = "jaxdit toyworld train"\ndescription = "d"\n[args]\nsteps = "ten"\n', "args.steps"),
    "float_for_int": ('command = "jaxdit toyworld train"\ndescription = "d"\n[args]\nt2i_batch = 4.5\n',
                      "args.t2i_batch"),
    "flag_not_bool": ('command = "jaxdit toyworld train"\ndescription = "d"\n[args]\ndetector = 1\n',
                      "args.detector"),
    "bool_for_value": ('command = "jaxdit toyworld train"\ndescription = "d"\n[args]\nlr = true\n', "args.lr"),
    "list_for_one": ('command = "jaxdit toyworld train"\ndescription = "d"\n[args]\nmix = ["pairs"]\n', "args.mix"),
    "not_a_choice": ('command = "jaxdit toyworld train"\ndescription = "d"\n[args]\nweights_from = "best"\n',
                     "args.weights_from"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_jaxdit_refuses_a_bad_file_in_one_line(monkeypatch, tmp_path, capsys, case):
    text, names = BAD[case]
    path = tmp_path / f"{case}.toml"
    if text is not None:
        path.write_text(text)
    monkeypatch.setattr(toyworld_cli, "_train", lambda args: pytest.fail("ran"))
    assert cli.main(["--config", str(path), "--steps", "5"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("jaxdit: error: ")
    assert str(path) in err and names in err, err


def test_suggestions_and_checker_messages(tmp_path):
    path = tmp_path / "x.toml"
    path.write_text('command = "jaxdit toyworld train"\ndescription = "d"\n[args]\nstepz = 3\n')
    with pytest.raises(experiment.ExperimentError, match=r"args\.stepz: no such option .*did you mean steps"):
        experiment.to_argv(experiment.load(path), cli.build_parser(), "jaxdit")
    path.write_text('command = "jaxdit toyworld train"\ndescription = "d"\n[args]\nsteps = 0\n')
    with pytest.raises(experiment.ExperimentError, match=r"args\.steps: expected a positive integer, got '0'"):
        experiment.to_argv(experiment.load(path), cli.build_parser(), "jaxdit")


@pytest.mark.parametrize("text,names", [
    ('command = "jaxdit toyworld train"\ndescription = "d"\n[args]\nsteps = 3\n', "command"),
    ('command = "benchmarks/sae_throughput.py"\ndescription = "d"\n[args]\nshape = "16:4:4:64"\n', "args.shape"),
    ('command = "benchmarks/sae_throughput.py"\ndescription = "d"\n[args]\nshape = ["16:4"]\n', "args.shape"),
    ('command = "benchmarks/sae_throughput.py"\ndescription = "d"\n[args]\nrounds = "many"\n', "args.rounds"),
    ('command = "benchmarks/sae_throughput.py"\ndescription = "d"\n[args]\nconfig = "other.toml"\n', "args.config"),
])
def test_benchmark_refuses_a_bad_file_in_one_line(tmp_path, capsys, text, names):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(SystemExit) as e:
        _bench("benchmarks/sae_throughput.py").main(["--config", str(path)])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ": error: " in err
    assert str(path) in err and names in err, err


def test_config_given_twice_and_convert_keeps_its_own_config(tmp_path):
    with pytest.raises(experiment.ExperimentError, match="given twice"):
        experiment.expand(cli.build_parser(), ["--config", PHASE3, "--config", PHASE3], "jaxdit")
    # `jaxdit convert --config JSON` is the transformer's config, not an experiment file
    argv = ["convert", "src", "out", "--config", "transformer.json"]
    assert experiment.expand(cli.build_parser(), argv, "jaxdit") == argv
    assert _jaxdit_args(argv).config == "transformer.json"
