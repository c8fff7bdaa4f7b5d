"""Bad config files (run config and study spec) give one clear message naming the file."""

import pytest

from megawsd.errors import ConfigError
from megawsd.study.spec import load_spec
from megawsd.train.config import load_config


@pytest.mark.parametrize("load, field", [(load_config, "config"), (load_spec, "study")])
def test_missing_invalid_and_non_mapping_files(tmp_path, load, field):
    with pytest.raises(ConfigError, match=rf"{field} = '.*nope.yaml': file not found"):
        load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match=rf"{field} = '.*bad.yaml': not valid YAML"):
        load(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(
        ConfigError, match=rf"{field} = '.*list.yaml': expected a mapping of keys, got list"
    ):
        load(lst)
