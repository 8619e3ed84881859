"""Each default is written once, in its config dataclass: the CLI flags, the KFP component
signatures and the pipeline parameters read it from there or must equal it.

Components import only stdlib and kfp at module level (their source runs in the image), so
their literal defaults are checked here against the dataclasses, in the compiled YAML.
"""

from __future__ import annotations

import inspect

import pytest
import yaml

from components import attribute_rewards, evaluate, ingest, train_generator
from genco.cli.main import build_parser
from genco.data.ingest import IngestConfig
from genco.evaluation.evaluate import EvalConfig
from genco.models.generator import GeneratorConfig
from genco.models.reward import RewardModelConfig
from genco.pipeline.runner import LOCAL_RL_STEPS, compile_pipeline
from genco.pipeline.steps import ingest_step

# window_days has no dataclass: the library step's signature is its home.
WINDOW_DAYS = inspect.signature(ingest_step).parameters["window_days"].default

PIPELINE = {
    "window_days": WINDOW_DAYS,
    "max_bad_fraction": IngestConfig.max_bad_fraction,
    "reward_epochs": RewardModelConfig.epochs,
    "rl_steps": GeneratorConfig.rl_steps,
    "seed": RewardModelConfig.seed,
    "margin": EvalConfig.margin,
}
COMPONENTS = {
    "ingest": {"window_days": WINDOW_DAYS, "max_bad_fraction": IngestConfig.max_bad_fraction},
    "attribute-rewards": {"epochs": RewardModelConfig.epochs, "seed": RewardModelConfig.seed},
    "train-generator": {"rl_steps": GeneratorConfig.rl_steps, "seed": GeneratorConfig.seed},
    "evaluate": {"margin": EvalConfig.margin},
}


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    path = tmp_path_factory.mktemp("defaults") / "retraining.yaml"
    return yaml.safe_load(open(compile_pipeline(str(path), local=True)))


def _defaults(spec: dict) -> dict:
    return {k: v.get("defaultValue") for k, v in spec["inputDefinitions"]["parameters"].items()}


def test_pipeline_parameters_default_to_the_dataclasses(compiled):
    defaults = _defaults(compiled["root"])
    assert {k: defaults[k] for k in PIPELINE} == PIPELINE


@pytest.mark.parametrize("name", sorted(COMPONENTS))
def test_component_signatures_default_to_the_dataclasses(compiled, name):
    defaults = _defaults(compiled["components"][f"comp-{name}"])
    assert {k: defaults[k] for k in COMPONENTS[name]} == COMPONENTS[name]


@pytest.mark.parametrize(
    "component", [ingest, attribute_rewards, train_generator, evaluate], ids=lambda c: c.name
)
def test_component_python_defaults_match_the_compiled_ones(compiled, component):
    # .python_func is what runs in the image: its defaults, not only the spec's, must agree.
    params = inspect.signature(component.python_func).parameters
    expected = COMPONENTS[component.name.replace("_", "-")]
    assert {k: params[k].default for k in expected} == expected


CLI = [
    (
        ["validate", "--catalog", "c", "--impressions", "i", "--out", "o"],
        {"max_bad_fraction": IngestConfig.max_bad_fraction, "chunk_rows": IngestConfig.chunk_rows},
    ),
    (
        ["attribute", "--catalog", "c", "--impressions", "i", "--out", "o"],
        {
            "max_bad_fraction": IngestConfig.max_bad_fraction,
            "epochs": RewardModelConfig.epochs,
            "dim": RewardModelConfig.dim,
            "propensity_weighting": RewardModelConfig.propensity_weighting,
            "seed": RewardModelConfig.seed,
        },
    ),
    (
        ["train", "--catalog", "c", "--impressions", "i", "--out", "o"],
        {
            "max_bad_fraction": IngestConfig.max_bad_fraction,
            "epochs": RewardModelConfig.epochs,
            "rl_steps": GeneratorConfig.rl_steps,
            "seed": RewardModelConfig.seed,
        },
    ),
    (
        [
            "pipeline",
            "schedule",
            "--host",
            "h",
            "--cron",
            "0",
            "--store",
            "s",
            "--catalog",
            "c",
            "--impressions",
            "i",
        ],
        PIPELINE,
    ),
    # The one named override: the local run trains fewer generator steps on purpose.
    (["pipeline", "run"], {**PIPELINE, "rl_steps": LOCAL_RL_STEPS}),
    (["evaluate", "--model", "m", "--data", "d", "--out", "o"], {"margin": EvalConfig.margin}),
]


@pytest.mark.parametrize(("argv", "expected"), CLI, ids=[" ".join(a[:2]) for a, _ in CLI])
def test_cli_flags_default_to_the_dataclasses(argv, expected):
    args = build_parser().parse_args(argv)
    assert {k: getattr(args, k) for k in expected} == expected


def test_cli_help_is_the_dataclass_help():
    text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert " ".join(GeneratorConfig.__dataclass_fields__["rl_steps"].metadata["help"].split()) in (
        " ".join(text.split())
    )
