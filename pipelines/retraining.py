"""The ``retraining`` pipeline definition (KFP v2); running, compiling and scheduling it live in
``genco.pipeline.runner``.

    decide_canary -> ingest -> attribute_rewards -> train_generator -> evaluate
        -> [if passed] deploy
        -> [if refused] start_canary (canary_share > 0)

The same definition runs under ``kfp.local.SubprocessRunner`` (every step a subprocess of
this Python, genco installed), compiles to the YAML that Kubeflow Pipelines and Vertex AI
Pipelines run unchanged, and becomes a recurring run through ``kfp.Client``.

Caching: attribute_rewards and train_generator are pure functions of their input artifacts
and parameters, so they are cacheable. ingest reads caller paths whose content may change
under the same name (a daily export overwritten in place), evaluate reads the store's
production pointer, and deploy moves it: those three always run.

Retries: no task has a Kubeflow retry policy. KFP's policy reruns a failed container after
its backoff whatever the failure, so a misspelt path would be retried for minutes; each step
retries transient failures (network, 5xx, 429) itself (``genco.retries``) and fails at once
on anything else.
"""

from kfp import dsl

from components import attribute_rewards, deploy, evaluate, ingest, train_generator
from components.canary import decide_canary, start_canary
from genco.data.ingest import IngestConfig
from genco.evaluation.evaluate import EvalConfig
from genco.models.generator import GeneratorConfig
from genco.models.reward import RewardModelConfig

PIPELINE_NAME = "genco-retraining"
COMPONENT_NAMES = (
    "decide-canary",
    "ingest",
    "attribute-rewards",
    "train-generator",
    "evaluate",
    "deploy",
    "start-canary",
)


@dsl.pipeline(
    name=PIPELINE_NAME,
    description="Validate the click log, fit the reward model, train the generator, evaluate "
    "against production and deploy when the candidate wins by the margin.",
)
def retraining(
    catalog: str,
    impressions: str,
    model_store: str,
    constraints: str = "",
    window_days: float = 0.0,
    max_bad_fraction: float = IngestConfig.max_bad_fraction,
    reward_epochs: int = RewardModelConfig.epochs,
    rl_steps: int = GeneratorConfig.rl_steps,
    seed: int = RewardModelConfig.seed,
    margin: float = EvalConfig.margin,
    served: str = EvalConfig.served,
    warm_start: bool = True,
    ground_truth: str = "",
    serving: bool = True,
    management_url: str = "",
    key_file: str = "",
    reward_workers: int = 1,
    trainer_image: str = "",
    canary_share: float = 0.0,
    canary_data: str = "",
    canary_ab: str = "all",
) -> None:
    """Retrain from the log at ``impressions`` and promote into ``model_store`` on a win.

    Paths are local or gs://. ``window_days``: keep the last N days of the log (0 = all).
    ``margin``: the candidate's off-policy value must reach production's x (1 + margin).
    ``served``: the policy the gate judges, as serving runs it: "greedy" (beam's top-1) or
    "thompson" (posterior draws).
    ``warm_start``: start both models from the store's production bundle when compatible.
    ``ground_truth``: a simulated world's ground_truth.npz, for the report only.
    ``serving``: a promotion also publishes the .mar in ``model_store``/kserve (the
    InferenceService's storageUri); ``management_url`` / ``key_file``: and registers it as
    the default on a running TorchServe. ``reward_workers`` > 1: the reward model is fitted
    by a Kubeflow Trainer TrainJob of that many nodes on ``trainer_image`` (artifacts must
    then live on an object store the nodes reach); 1 = in the step itself.
    ``canary_share`` > 0: a candidate the gate refuses is started as the store's canary on
    that share of requests (``genco canary manifest`` renders KServe's traffic split);
    ``canary_data``: the served log joined to its clicks, on which the next run first
    promotes or rolls back the running canary (``genco.evaluation.canary``); ``canary_ab``
    "triggered": on the requests where the two bundles' greedy picks differ (greedy serving).
    """
    decided = decide_canary(
        model_store=model_store,
        canary_data=canary_data,
        margin=margin,
        serving=serving,
        management_url=management_url,
        key_file=key_file,
        canary_ab=canary_ab,
    )
    decided.set_caching_options(False)
    decided.set_cpu_request("500m").set_memory_request("1G")

    data = ingest(
        catalog=catalog,
        impressions=impressions,
        constraints=constraints,
        window_days=window_days,
        max_bad_fraction=max_bad_fraction,
    )
    data.set_caching_options(False)
    data.after(decided)  # one order on every run: the canary's decision first
    data.set_cpu_request("1").set_memory_request("2G").set_memory_limit("8G")

    rewards = attribute_rewards(
        data=data.outputs["data"],
        epochs=reward_epochs,
        seed=seed,
        model_store=model_store,
        warm_start=warm_start,
        workers=reward_workers,
        trainer_image=trainer_image,
    )
    rewards.set_cpu_request("2").set_memory_request("4G").set_memory_limit("16G")

    bundle = train_generator(
        data=data.outputs["data"],
        rewards=rewards.outputs["rewards"],
        rl_steps=rl_steps,
        seed=seed,
        model_store=model_store,
        warm_start=warm_start,
    )
    bundle.set_cpu_request("2").set_memory_request("4G").set_memory_limit("16G")

    gate = evaluate(
        bundle=bundle.outputs["bundle"],
        data=data.outputs["data"],
        model_store=model_store,
        margin=margin,
        ground_truth=ground_truth,
        served=served,
    )
    gate.set_caching_options(False)
    gate.after(decided)  # judged against production as the canary's decision left it
    gate.set_cpu_request("2").set_memory_request("4G").set_memory_limit("16G")

    with dsl.If(gate.outputs["Output"] == True, name="candidate-wins"):  # noqa: E712
        promoted = deploy(
            bundle=bundle.outputs["bundle"],
            gate=gate.outputs["gate"],
            model_store=model_store,
            serving=serving,
            management_url=management_url,
            key_file=key_file,
        )
        promoted.set_caching_options(False)
        promoted.set_cpu_request("500m").set_memory_request("1G")

    with dsl.If(gate.outputs["Output"] == False, name="candidate-refused"):  # noqa: E712
        canary = start_canary(
            bundle=bundle.outputs["bundle"],
            gate=gate.outputs["gate"],
            model_store=model_store,
            share=canary_share,
            serving=serving,
        )
        canary.set_caching_options(False)
        canary.set_cpu_request("500m").set_memory_request("1G")
