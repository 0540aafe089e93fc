"""The pipeline and the `sigma-fast` commands end to end on a small synthetic catalogue (tiny
backbone, hashed text features), and their errors."""

import json

import pytest

from sigma_fixtures import needs_minilm, small_run_settings, write_pattern_dataset

from sigma_fast.apps.cli import main


@needs_minilm
@pytest.mark.e2e
def test_demo_then_each_command(tmp_path, capsys):
    data = write_pattern_dataset(tmp_path / "pat")
    run = tmp_path / "run"
    assert main(["demo", "--run", str(run), *small_run_settings(data)]) == 0
    out = capsys.readouterr().out
    for stage in ("[prepare]", "[ground]", "[tokenize]", "[train]", "[evaluate]",
                  "[recommend]", "[demo] finished"):
        assert stage in out, stage
    res = json.loads((run / "eval" / "results.json").read_text())
    assert {"sigma", "most_popular", "sasrec"} <= set(res)
    assert (run / "eval" / "results.md").is_file()
    assert (run / "models" / "sigma" / "sigma_model.json").is_file()
    assert "train]" in out and "HR@10" in out
    # the run's config.toml is reused by later commands
    assert main(["evaluate", "--run", str(run), "--variants", "sigma", "no_apf",
                 "--baselines", "most_popular", "--quiet"]) == 0
    res = json.loads((run / "eval" / "results.json").read_text())
    assert {"sigma", "no_apf", "most_popular"} <= set(res)
    capsys.readouterr()
    assert main(["recommend", "--run", str(run), "--history", "Movie number 3",
                 "Movie number 4", "--top-n", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 4 and all("Movie number" in x for x in lines)
    assert main(["recommend", "--run", str(run), "--user", "u1", "--task", "Category",
                 "--top-n", "3"]) == 0
    capsys.readouterr()
    assert main(["recommend", "--run", str(run), "--history", "No such film"]) == 2
    assert "unknown title" in capsys.readouterr().err


def test_commands_fail_clearly(tmp_path, capsys):
    assert main(["train", "--run", str(tmp_path / "missing")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["prepare", "--run", str(tmp_path / "r"), "--set", "train.stepz=3"]) == 2
    assert "unknown setting 'train.stepz'" in capsys.readouterr().err
    assert main(["prepare", "--run", str(tmp_path / "r"), "--set", "train.steps=many"]) == 2
    assert "must be int" in capsys.readouterr().err
    assert main(["prepare", "--run", str(tmp_path / "r"), "--set", "oops"]) == 2
    assert "section.key=value" in capsys.readouterr().err
    bad = tmp_path / "bad.toml"
    bad.write_text("[train\nsteps = 3")
    assert main(["prepare", "--run", str(tmp_path / "r"), "--config", str(bad)]) == 2
    assert "not valid TOML" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path / "r2"), "--config", str(tmp_path / "no.toml")]) == 2
    with pytest.raises(SystemExit):
        main(["train", "--variants", "nonsense"])


def test_config_round_trip(tmp_path):
    from sigma_fast.rec.pipeline import DEFAULTS, config_toml, load_config

    path = tmp_path / "c.toml"
    path.write_text(config_toml(DEFAULTS))
    assert load_config(path) == DEFAULTS
    path.write_text("[train]\nsteps = 5\nvariants = [\"sigma\", \"gr_id\"]\n")
    cfg = load_config(path, {"eval": {"top_n": 25}})
    assert cfg["train"]["steps"] == 5 and cfg["eval"]["top_n"] == 25
    with pytest.raises(ValueError, match="top_n must be >= 20"):
        load_config(None, {"eval": {"top_n": 5}})
    with pytest.raises(ValueError, match="unknown variant"):
        load_config(None, {"eval": {"variants": ["best"]}})
