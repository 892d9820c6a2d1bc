"""One declaration per config, and every view derived from it: flags, JSON, MLflow params, --set."""

import json

import pytest

from pydantic import BaseModel

from nanochat_core.config import BaseTrainConfig, PipelineConfig, ServingConfig, flatten
from nanochat_core.flags import config_from_args, load_json, set_dotted, stage_parser
from nanochat_core.errors import UserError
from nanochat_core.presets import PRESETS, get_preset


def parse(argv, stages={"base_train": None, "tok_train": None}):
    return config_from_args(stage_parser("nanochat test", "", stages).parse_args(argv))


@pytest.mark.parametrize("root", [PipelineConfig, ServingConfig])
def test_every_field_has_help_and_a_flag(root):
    for stage, info in root.model_fields.items():
        if not isinstance(info.default, BaseModel):
            continue
        parser = stage_parser("nanochat test", "", {stage: None}, root)
        flags = {opt for action in parser._actions for opt in action.option_strings}
        cls = root.model_fields[stage].annotation
        for name, field in cls.model_fields.items():
            assert field.description, f"{stage}.{name} has no help text"
            assert "--" + name.replace("_", "-") in flags, f"{stage}.{name} has no flag"


def test_flags_override_the_preset_and_only_when_given():
    cfg = parse(["--preset", "d12", "--device-batch-size", "8", "--max-chars", "2e9", "--no-compile"])
    assert cfg.preset == "d12"
    assert cfg.base_train.depth == 12  # from the preset
    assert cfg.base_train.device_batch_size == 8
    assert cfg.tok_train.max_chars == 2_000_000_000
    assert cfg.base_train.compile is False


def test_bad_flag_value_is_one_sentence(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse(["--depth", "four"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: argument --depth: 'four' is not a whole number") and "\n" not in err


def test_out_of_range_value_names_the_flag():
    with pytest.raises(UserError, match=r"--depth"):
        parse(["--depth", "0"])


def test_json_round_trip_feeds_a_child(tmp_path):
    cfg = get_preset("tiny")
    path = tmp_path / "cfg.json"
    path.write_text(cfg.model_dump_json())
    assert load_json(PipelineConfig, path) == cfg
    assert parse(["--config", str(path), "--depth", "3"]).base_train.depth == 3


def test_corrupt_json_names_the_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"base_train": {"depht": 3}}))
    with pytest.raises(UserError, match="cfg.json"):
        load_json(PipelineConfig, path)


def test_flatten_gives_dotted_mlflow_params():
    flat = flatten(get_preset("d20"))
    assert flat["base_train.depth"] == 20
    assert flat["corpus.tiers"] == "lit,docs"
    assert all(not isinstance(v, (dict, list)) for v in flat.values())


def test_set_dotted():
    cfg = set_dotted(get_preset("tiny"), "base_train.depth=3")
    assert cfg.base_train.depth == 3
    assert set_dotted(cfg, "download.url_template=s3://b/shard_{index:05d}.parquet").download.url_template.startswith("s3://")
    for bad in ["base_train.depth", "nope.depth=1", "base_train.nope=1", "base_train.depth=-1"]:
        with pytest.raises(UserError):
            set_dotted(cfg, bad)


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_validates_and_plans(name):
    from nanochat_core.plan import plan_for

    cfg = get_preset(name)
    assert cfg.preset == name
    PipelineConfig.model_validate(cfg.model_dump())  # the Prefect parameter path
    plan = plan_for(cfg)
    assert plan.grad_accum_steps >= 1 and plan.num_iterations >= 1


def test_prefect_parameter_schema_comes_from_the_same_declaration():
    schema = PipelineConfig.model_json_schema()
    train = schema["$defs"]["BaseTrainConfig"]["properties"]
    assert train["depth"]["description"] == BaseTrainConfig.model_fields["depth"].description


def test_serving_settings_and_secrets_stay_out_of_the_pipeline_config(monkeypatch):
    """The flow takes PipelineConfig as its parameter and logs it to MLflow: no serving section, no key."""
    monkeypatch.setenv("NANOCHAT_API_KEY", "sk-never-a-parameter")
    assert not {"serve", "chat", "inference"} & set(PipelineConfig.model_fields)
    assert "api_key" not in type(ServingConfig().serve).model_fields
    for preset in PRESETS.values():
        assert "sk-never-a-parameter" not in json.dumps(flatten(preset()))


def test_your_files_replace_the_tiers_unless_tiers_are_given_too():
    """The same rule for a flow parameter, a config without a preset and the command's flags."""
    from nanochat_core.stage_args import parser

    assert PipelineConfig(preset="tiny", corpus={"sources": ["/zh"]}).corpus.tiers == []
    assert PipelineConfig(corpus={"sources": ["/zh"]}).corpus.tiers == []
    assert PipelineConfig(preset="tiny", corpus={"sources": ["/zh"], "tiers": ["docs"]}).corpus.tiers == ["docs"]
    assert PipelineConfig(preset="tiny").corpus.tiers == ["lit"]
    for extra, tiers in (([], []), (["--tiers", "lit,docs"], ["lit", "docs"])):
        ns = parser("corpus").parse_args(["--preset", "tiny", "--from", "/zh", *extra])
        assert config_from_args(ns).corpus.tiers == tiers
