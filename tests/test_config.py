import pytest

from xmodal_index.jobs.config import ConfigError, load_config


def test_toml_config_sets_component_fields(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('[decode]\nsegment_s = 1\n[encoder]\nbits = 32\n[run]\nmax_error_fraction = 0.5\n')
    cfg = load_config(str(p))
    assert cfg.decode.segment_s == 1.0
    assert cfg.encoder.bits == 32
    assert cfg.run.max_error_fraction == 0.5


def test_unknown_key_is_refused_with_its_name(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text("[decode]\nsegment_seconds = 1\n")
    with pytest.raises(ConfigError, match="segment_seconds.*allowed.*segment_s"):
        load_config(str(p))


def test_unknown_table_is_refused(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text("[decoder]\nx = 1\n")
    with pytest.raises(ConfigError, match="decoder"):
        load_config(str(p))


def test_bad_value_names_the_field(tmp_path):
    p = tmp_path / "job.json"
    p.write_text('{"encoder": {"bits": 48}}')
    with pytest.raises(ConfigError, match="bits"):
        load_config(str(p))


def test_wrong_type_is_refused(tmp_path):
    p = tmp_path / "job.toml"
    p.write_text('[decode]\nsegment_s = "long"\n')
    with pytest.raises(ConfigError, match="segment_s"):
        load_config(str(p))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(str(tmp_path / "nope.toml"))
