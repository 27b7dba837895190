import pytest

from ovd.config import Config, ConfigError, load_config, parse_overrides, save_config


def write(p, text):
    p.write_text(text)
    return p


def test_defaults_are_typed_dataclasses():
    cfg = load_config()
    assert isinstance(cfg, Config)
    assert cfg.SOLVER.BASE_LR == 0.02 and cfg.SOLVER.STEPS == [60000, 80000]
    assert cfg.MODEL.ROI_BOX_HEAD.NORM_TEMP == 50.0


def test_base_inheritance_and_overrides(tmp_path):
    write(tmp_path / "base.yaml", "SOLVER:\n  BASE_LR: 0.1\n  MAX_ITER: 10\nOUTPUT_DIR: a\n")
    write(tmp_path / "child.yaml", "_BASE_: base.yaml\nSOLVER:\n  MAX_ITER: 20\n")
    cfg = load_config(tmp_path / "child.yaml", ["OUTPUT_DIR=b", "SOLVER.STEPS", "[5, 8]", "MODEL.WEIGHTS", "x.pth"])
    assert cfg.SOLVER.BASE_LR == 0.1  # from the base
    assert cfg.SOLVER.MAX_ITER == 20  # child wins
    assert cfg.OUTPUT_DIR == "b" and cfg.SOLVER.STEPS == [5, 8] and cfg.MODEL.WEIGHTS == "x.pth"


def test_unknown_key_names_file_and_closest_key(tmp_path):
    f = write(tmp_path / "c.yaml", "MODEL:\n  RPN:\n    NMS_THRES: 0.5\n")
    with pytest.raises(ConfigError, match=r"MODEL\.RPN\.NMS_THRES in .*c\.yaml; did you mean MODEL\.RPN\.NMS_THRESH"):
        load_config(f)


def test_unknown_override_suggests_key():
    with pytest.raises(ConfigError, match=r"SOLVER\.BASE_L.*did you mean SOLVER\.BASE_LR"):
        load_config(None, ["SOLVER.BASE_L=0.1"])


def test_wrong_type_names_expected_type(tmp_path):
    f = write(tmp_path / "c.yaml", "SOLVER:\n  MAX_ITER: ten\n")
    with pytest.raises(ConfigError, match=r"SOLVER\.MAX_ITER in .*c\.yaml: expected int"):
        load_config(f)


def test_section_given_a_scalar(tmp_path):
    f = write(tmp_path / "c.yaml", "SOLVER: 3\n")
    with pytest.raises(ConfigError, match="SOLVER .* must be a mapping"):
        load_config(f)


def test_base_cycle_and_missing_base(tmp_path):
    write(tmp_path / "a.yaml", "_BASE_: b.yaml\n")
    write(tmp_path / "b.yaml", "_BASE_: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    write(tmp_path / "c.yaml", "_BASE_: nowhere.yaml\n")
    with pytest.raises(ConfigError, match=r"nowhere\.yaml .*_BASE_ of .*c\.yaml"):
        load_config(tmp_path / "c.yaml")


def test_override_without_value():
    with pytest.raises(ConfigError, match="no value"):
        parse_overrides(["SOLVER.MAX_ITER"])


def test_saved_config_loads_back_identically(tmp_path):
    cfg = load_config(None, ["SOLVER.MAX_ITER=7", "MODEL.ANCHOR_GENERATOR.SIZES=[[16],[32]]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_env_interpolation(tmp_path, monkeypatch):
    monkeypatch.setenv("OVD_DATASETS", "/data/x")
    f = write(tmp_path / "c.yaml", "MODEL:\n  WEIGHTS: ${oc.env:OVD_DATASETS,datasets}/w.pth\n")
    assert load_config(f).MODEL.WEIGHTS == "/data/x/w.pth"


@pytest.mark.parametrize("path", sorted(__import__("pathlib").Path(__file__).parents[1].glob("configs/**/*.yaml")))
def test_shipped_configs_load(path):
    load_config(path)
