import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from memflow.config import dit_config
from utils.config import (
    get_field,
    load_config,
    parse_cli,
    require_bool,
    require_choice,
    require_existing_path,
    require_int_list,
    require_multiple_of,
    require_number,
    require_positive_int,
    run_cli,
    to_container,
)
from utils.errors import ConfigError, MemFlowError

ROOT = Path(__file__).resolve().parents[2]

DEFAULTS = """\
num_output_frames: 240
output_folder: videos
seed: 0
guidance: 3.0
use_ema: false
switch_frame_indices: [40, 80]
lora_ckpt: null
run_name: run_${seed}
model_kwargs:
  bank_size: 3
  memory: nam
  local_attn_size: 12
"""


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def defaults(tmp_path: Path) -> Path:
    return write(tmp_path, "defaults.yaml", DEFAULTS)


# ------------------------------------------------------------------ parse_cli


def test_parse_cli_splits_flags_and_overrides():
    path, flags, overrides = parse_cli(
        ["--config_path", "c.yaml", "--logdir", "logs", "--resume", "output_folder=out", "model_kwargs.bank_size=4"]
    )
    assert path == "c.yaml"
    assert flags == {"logdir": "logs", "resume": True}
    assert overrides == ["output_folder=out", "model_kwargs.bank_size=4"]


def test_parse_cli_default_config_and_no_flags():
    path, flags, overrides = parse_cli([], default_config="configs/inference.yaml")
    assert path == "configs/inference.yaml"
    assert flags == {"logdir": None, "resume": False}
    assert overrides == []


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["foo"], "'foo' is not of the form key=value"),
        (["=3"], "'=3' is not of the form key=value"),
        (["bad key=3"], "not a dotted name"),
        (["--unknown", "x"], "unknown option '--unknown'"),
        (["--config_path"], "expected one argument"),
    ],
)
def test_parse_cli_rejects_bad_tokens(argv, needle):
    with pytest.raises(ConfigError, match=needle):
        parse_cli(argv)


# ------------------------------------------------------------------ load_config


def test_load_single_file_with_overrides(defaults):
    cfg = load_config(defaults, ["output_folder=out", "model_kwargs.bank_size=4", "guidance=5"])
    assert cfg.output_folder == "out"
    assert cfg.model_kwargs.bank_size == 4
    assert cfg.model_kwargs.memory == "nam"
    assert cfg.guidance == 5
    assert cfg.run_name == "run_0"


def test_overrides_replace_lists_and_nulls(defaults):
    cfg = load_config(defaults, ["switch_frame_indices=[30,60,90]", "lora_ckpt=ckpt/lora.pt"])
    assert list(cfg.switch_frame_indices) == [30, 60, 90]
    assert cfg.lora_ckpt == "ckpt/lora.pt"


def test_mapping_override_merges_and_checks_keys(defaults):
    cfg = load_config(defaults, ["model_kwargs={bank_size: 5}"])
    assert cfg.model_kwargs.bank_size == 5
    assert cfg.model_kwargs.memory == "nam"
    with pytest.raises(ConfigError, match=r"unknown config key 'model_kwargs\.bank_sze'"):
        load_config(defaults, ["model_kwargs={bank_sze: 5}"])


def test_unknown_override_suggests_closest_key(defaults):
    with pytest.raises(ConfigError) as info:
        load_config(defaults, ["model_kwargs.bank_sze=4"])
    assert "unknown config key 'model_kwargs.bank_sze' (did you mean 'model_kwargs.bank_size'?)" in str(info.value)


def test_unknown_leaf_without_prefix_suggests_full_path(defaults):
    with pytest.raises(ConfigError, match=r"'bank_size' \(did you mean 'model_kwargs.bank_size'\?\)"):
        load_config(defaults, ["bank_size=4"])


def test_override_type_mismatch_names_field(defaults):
    with pytest.raises(ConfigError, match="num_output_frames must be an integer"):
        load_config(defaults, ["num_output_frames=abc"])
    with pytest.raises(ConfigError, match="use_ema must be true/false"):
        load_config(defaults, ["use_ema=3"])


def test_override_value_parse_error(defaults):
    with pytest.raises(ConfigError, match="cannot parse the value"):
        load_config(defaults, ["switch_frame_indices=[1,2"])


def test_layered_config_rejects_unknown_yaml_key(tmp_path, defaults):
    run = write(tmp_path, "run.yaml", "num_output_frames: 120\nmodel_kwargs:\n  bank_sise: 2\n")
    with pytest.raises(ConfigError) as info:
        load_config(run, [], defaults_path=defaults)
    msg = str(info.value)
    assert str(run) in msg
    assert "unknown config key 'model_kwargs.bank_sise' (did you mean 'model_kwargs.bank_size'?)" in msg


def test_layered_config_merges(tmp_path, defaults):
    run = write(tmp_path, "run.yaml", "num_output_frames: 120\nmodel_kwargs:\n  bank_size: 2\n")
    cfg = load_config(run, ["seed=7"], defaults_path=defaults)
    assert cfg.num_output_frames == 120
    assert cfg.model_kwargs.bank_size == 2
    assert cfg.model_kwargs.local_attn_size == 12
    assert cfg.run_name == "run_7"


def test_model_overrides_take_any_dit_field_and_the_dit_config_names_an_unknown_one(tmp_path):
    """model_overrides is passed whole to the DiT config: the YAML's ``{}`` must not make every field unknown."""
    cfg = load_config(ROOT / "configs/inference.yaml", ["model_overrides.text_dim=384"])
    assert dict(cfg.model_overrides) == {"text_dim": 384}
    cfg = load_config(ROOT / "configs/toy/interactive_inference.yaml", ["model_overrides={patch_size: [1, 1, 1]}"])
    assert list(cfg.model_overrides.patch_size) == [1, 1, 1] and cfg.model_overrides.text_dim == 384
    run = write(tmp_path, "run.yaml", "model_overrides:\n  text_dim: 384\n")
    assert load_config(run, [], defaults_path=ROOT / "configs/inference.yaml").model_overrides.text_dim == 384
    with pytest.raises(ConfigError, match="must be an integer"):
        load_config(ROOT / "configs/toy/interactive_inference.yaml", ["model_overrides.text_dim=wide"])
    with pytest.raises(ValueError, match="'text_dimm' is not a DiT config field"):
        dit_config("tiny", text_dimm=384)


def test_missing_config_file_names_path(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=f"config file {missing} does not exist"):
        load_config(missing)


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    bad = write(tmp_path, "bad.yaml", "a: 1\nb: [1, 2\nc: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    msg = str(info.value)
    assert msg.startswith(f"{bad}:3:")
    assert "\n" not in msg


def test_yaml_duplicate_key_names_line(tmp_path):
    bad = write(tmp_path, "dup.yaml", "a: 1\nb:\n  c: 2\n  c: 3\n")
    with pytest.raises(ConfigError, match=rf"{bad}:4:\d+: YAML syntax error: found duplicate key c"):
        load_config(bad)


def test_top_level_list_is_rejected(tmp_path):
    bad = write(tmp_path, "list.yaml", "- 1\n- 2\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(bad)


def test_to_container_resolves_and_reports_bad_interpolation(tmp_path, defaults):
    assert to_container(load_config(defaults))["run_name"] == "run_0"
    broken = write(tmp_path, "broken.yaml", "a: ${nothing}\n")
    with pytest.raises(ConfigError, match="config:"):
        to_container(load_config(broken))


# ------------------------------------------------------------------ validators


@pytest.fixture
def cfg():
    return OmegaConf.create(
        {
            "num_output_frames": 240,
            "odd": 241,
            "zero": 0,
            "flag": True,
            "ratio": 0.5,
            "name": "nam",
            "indices": [40, 80],
            "nested": {"bank_size": 3},
            "path": __file__,
        }
    )


def test_validators_accept_good_values(cfg):
    assert require_positive_int(cfg, "num_output_frames") == 240
    assert require_positive_int(cfg, "nested.bank_size") == 3
    assert require_multiple_of(cfg, "num_output_frames", 3) == 240
    assert require_number(cfg, "ratio", 0, 1) == 0.5
    assert require_choice(cfg, "name", ["none", "nam"]) == "nam"
    assert require_bool(cfg, "flag") is True
    assert require_int_list(cfg, "indices") == [40, 80]
    assert require_existing_path(cfg, "path") == Path(__file__)
    assert get_field(cfg, "nested") == {"bank_size": 3}


@pytest.mark.parametrize(
    ("check", "needle"),
    [
        (lambda c: require_positive_int(c, "zero"), "zero must be >= 1, got 0"),
        (lambda c: require_positive_int(c, "flag"), "flag must be an integer"),
        (lambda c: require_positive_int(c, "nested.missing"), "nested.missing is not set"),
        (
            lambda c: require_multiple_of(c, "odd", 3, "num_frame_per_block"),
            r"odd=241 must be a multiple of 3 \(num_frame_per_block\); use e.g. 240 or 243",
        ),
        (lambda c: require_number(c, "ratio", 0.6, 1.0), r"ratio=0.5 is out of range; use a value in \[0.6, 1.0\]"),
        (lambda c: require_choice(c, "name", ["none", "full"]), "name='nam' is not allowed; choose one of"),
        (lambda c: require_bool(c, "zero"), "zero must be true or false"),
        (lambda c: require_int_list(c, "name"), "name must be a list of integers"),
        (lambda c: require_existing_path(c, "name"), "name: file nam does not exist"),
        (lambda c: require_existing_path(c, "path", kind="dir"), "path: folder .* does not exist"),
    ],
)
def test_validators_name_field_and_fix(cfg, check, needle):
    with pytest.raises(ConfigError, match=needle):
        check(cfg)


# ------------------------------------------------------------------ run_cli


def run_snippet(body: str) -> subprocess.CompletedProcess:
    code = "import sys\nfrom utils.config import run_cli\nfrom utils.errors import ConfigError\n" + body
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_run_cli_memflow_error_is_one_line_exit_2():
    done = run_snippet(
        "def main(argv):\n    raise ConfigError('bank_size must be >= 1;\\n set bank_size=3')\nrun_cli(main, [])\n"
    )
    assert done.returncode == 2
    assert done.stderr == "error: bank_size must be >= 1; set bank_size=3\n"


def test_run_cli_passes_exit_code_and_argv():
    done = run_snippet("def main(argv):\n    print(argv)\n    return 3\nrun_cli(main, ['a=1'])\n")
    assert done.returncode == 3
    assert done.stdout.strip() == "['a=1']"


def test_run_cli_keyboard_interrupt_exits_130():
    done = run_snippet("def main(argv):\n    raise KeyboardInterrupt\nrun_cli(main, [])\n")
    assert done.returncode == 130
    assert "Traceback" not in done.stderr


def test_run_cli_in_process(capsys):
    def main(argv: list[str]) -> int:
        raise MemFlowError("output folder /x is not writable")

    with pytest.raises(SystemExit) as info:
        run_cli(main, [])
    assert info.value.code == 2
    assert capsys.readouterr().err == "error: output folder /x is not writable\n"
