"""Config loading, overrides and every rejection, through the library and the CLI."""

import os
import re
from pathlib import Path

import pytest
import yaml

from jaxcf import config as cfg
from jaxcf.cli.train import main


def test_defaults_match_the_notebook():
    c = cfg.Config()
    assert (c.seed, c.data.name, c.data.valid_fraction) == (42, "ml-latest-small", 0.2)
    assert (c.model.kind, c.model.n_factors, c.model.y_range) == ("bias", 50, None)
    assert (c.optim.name, c.optim.learning_rate, c.optim.weight_decay) == ("adamw", 1e-3, 1e-4)
    assert (c.train.epochs, c.train.batch_size) == (5, 64)


def test_shipped_configs_load_and_say_what_they_reach():
    for name in ("bias.yaml", "dot.yaml"):
        path = cfg.resolve_path(name)
        text = path.read_text()
        assert text.startswith("#") and "python -m jaxcf.train" in text and "RMSE" in text
        c = cfg.load(name)
        assert c.train.epochs == 5 and c.optim.learning_rate == 1e-3 and c.model.n_factors == 50
    assert cfg.load("dot").model.kind == "dot"
    assert cfg.load("bias").model.kind == "bias"


def test_top_level_configs_are_the_shipped_ones():
    root = Path(__file__).parents[1]
    for name in ("bias.yaml", "dot.yaml"):
        assert (root / "configs" / name).read_text() == cfg.resolve_path(name).read_text()


def test_config_name_resolves_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cfg.load("bias.yaml").model.kind == "bias"
    assert cfg.load("configs/dot.yaml").model.kind == "dot"


def test_overrides_parse_yaml_values():
    c = cfg.load("bias.yaml", ["optim.learning_rate=3e-3", "model.y_range=[0, 5.5]", "optim.name=adam"])
    assert c.optim.learning_rate == 3e-3  # "3e-3" is a string in YAML 1.1; accepted as the number meant
    assert c.model.y_range == (0.0, 5.5)
    assert c.optim.name == "adam"


def test_yaml11_exponent_without_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  learning_rate: 1e-3\n  weight_decay: 1e-4\n")
    assert yaml.safe_load(path.read_text())["optim"]["learning_rate"] == "1e-3"  # the YAML 1.1 trap
    c = cfg.load(path)
    assert c.optim.learning_rate == 1e-3 and c.optim.weight_decay == 1e-4


def test_round_trip_through_dump():
    c = cfg.load("bias.yaml", ["model.y_range=[0.5, 5]"])
    assert cfg.from_dict(yaml.safe_load(cfg.dump(c))) == c


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["optim.learnin_rate=1"], "did you mean 'learning_rate'"),
        (["modle.kind=dot"], "did you mean 'model'"),
        (["optim.learning_rate=0"], "optim.learning_rate: must be a finite number > 0"),
        (["optim.learning_rate=-1e-3"], "optim.learning_rate: must be a finite number > 0"),
        (["optim.learning_rate=fast"], "optim.learning_rate: expected a number"),
        (["optim.weight_decay=-1"], "optim.weight_decay: must be a finite number >= 0"),
        (["train.batch_size=0"], "train.batch_size: must be an integer >= 1"),
        (["train.batch_size=6.5"], "train.batch_size: expected an integer"),
        (["train.epochs=0"], "train.epochs: must be an integer >= 1"),
        (["data.valid_fraction=1"], "data.valid_fraction: must be in [0, 1)"),
        (["data.valid_fraction=-0.1"], "data.valid_fraction: must be in [0, 1)"),
        (["data.valid_fraction=.nan"], "data.valid_fraction: must be in [0, 1)"),
        (["data.valid_fraction=0", "train.early_stopping_patience=2"],
         "train.early_stopping_patience needs validation"),
        (["data.split=u1", "data.name=ml-100k", "train.early_stopping_patience=2"],
         "train.early_stopping_patience needs validation"),
        (["data.valid_path=v.csv", "data.leave_last=1"], "data.valid_path and data.leave_last"),
        (["model.n_factors=0"], "model.n_factors: must be an integer >= 1"),
        (["model.kind=mlp"], "model.kind: unknown value 'mlp'"),
        (["optim.name=adamm"], "did you mean 'adam'"),
        (["model.y_range=[5, 1]"], "model.y_range: must be [low, high]"),
        (["model.y_range=3"], "model.y_range: expected a list of 2 numbers"),
        (["seed=true"], "seed: expected an integer"),
        (["train=5"], "train: expected a mapping"),
        (["data.user_col=movieId"], "must differ"),
        (["optim.learning_rate"], "--set expects key=value"),
    ],
)
def test_rejections(overrides, message):
    with pytest.raises(cfg.ConfigError, match=re.escape(message)):
        cfg.load("bias.yaml", overrides)


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("seed: 42\nmodel:\n  kind: [dot\n")
    with pytest.raises(cfg.ConfigError, match=r"YAML syntax error in .* at line \d+"):
        cfg.load(path)


def test_missing_config_lists_the_shipped_ones():
    with pytest.raises(cfg.ConfigError, match="config file not found.*bias.yaml"):
        cfg.load("no-such-config.yaml")


def test_config_that_is_not_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(cfg.ConfigError, match="must hold a mapping"):
        cfg.load(path)


def _cli(argv, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = main([*argv, "--workdir", str(workdir), "--quiet"])
    captured = capsys.readouterr()
    return code, captured, workdir


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--config", "bias.yaml", "--set", "optim.learning_rate=0"], "optim.learning_rate"),
        (["--config", "bias.yaml", "--set", "model.kind=mlp"], "model.kind"),
        (["--config", "bias.yaml", "--set", "train.epochs=0"], "train.epochs"),
        (["--config", "bias.yaml", "--set", "bogus.key=1"], "unknown config key bogus"),
        (["--config", "missing.yaml"], "config file not found"),
    ],
)
def test_cli_rejects_with_one_line_and_exit_2_writing_nothing(argv, message, tmp_path, capsys):
    code, captured, workdir = _cli(argv, tmp_path, capsys)
    assert code == 2
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert "Traceback" not in captured.err
    assert not workdir.exists()


def test_cli_rejects_a_yaml_syntax_error(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {kind: bias\n")
    code, captured, workdir = _cli(["--config", str(bad)], tmp_path, capsys)
    assert code == 2 and "line" in captured.err and not workdir.exists()
    assert os.listdir(tmp_path) == ["bad.yaml"]
