"""``genco pipeline schedule``: one recurring run of the retraining pipeline per name.

Idempotent by refusal: a recurring run with the same name in the experiment is never
duplicated (two schedules would race on the store's pointer). Running the command again
fails with one line naming the existing run, unless ``replace`` is given, which deletes
it and creates the new one: changing a production schedule is a deliberate act, and in a
shared namespace a name clash is more often someone else's schedule than a re-run of ours.
KFP's API has no update for recurring runs, so replace is delete-then-create; the window
between the two has no schedule, never two.

Where to connect and as whom follows the KFP client's conventions: ``host`` or
``$KF_PIPELINES_ENDPOINT``; auth by a bearer token (``$KF_PIPELINES_TOKEN``), a service
account token file (``token_file``, or ``$KF_PIPELINES_SA_TOKEN_PATH`` as kfp reads it,
refreshed on every call), a session cookie (``$KF_PIPELINES_COOKIES``: Dex/oauth2-proxy
installs), or IAP (``$KF_PIPELINES_IAP_OAUTH2_CLIENT_ID``, read by kfp itself).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
from dataclasses import dataclass
from typing import Any

from genco.errors import ConfigError


@dataclass
class ScheduleTarget:
    """Where the recurring run goes and what it runs as; None fields take the environment
    (``from_env``) and then kfp's own defaults."""

    host: str | None = None
    namespace: str | None = None
    service_account: str | None = None
    pipeline_root: str | None = None
    token_file: str | None = None
    experiment: str = "genco"
    job_name: str = "genco-retraining-daily"

    def from_env(self) -> ScheduleTarget:
        env = os.environ.get
        return ScheduleTarget(
            host=self.host or env("KF_PIPELINES_ENDPOINT") or None,
            namespace=self.namespace or env("KF_PIPELINES_NAMESPACE") or None,
            service_account=self.service_account or env("KF_PIPELINES_SERVICE_ACCOUNT") or None,
            pipeline_root=self.pipeline_root or env("KF_PIPELINES_PIPELINE_ROOT") or None,
            token_file=self.token_file or env("KF_PIPELINES_SA_TOKEN_PATH") or None,
            experiment=self.experiment,
            job_name=self.job_name,
        )


def kfp_cron(cron: str) -> str:
    """KFP's six-field cron (seconds first) from the usual five fields, or six as given."""
    fields = cron.split()
    if len(fields) not in (5, 6):
        raise ConfigError(f"cron '{cron}' must have 5 fields (minute hour day month weekday)")
    return " ".join(["0", *fields]) if len(fields) == 5 else cron


def kfp_client(target: ScheduleTarget) -> Any:
    """A ``kfp.Client`` for ``target`` (already resolved with ``from_env``)."""
    import kfp

    if not target.host:
        raise ConfigError(
            "no Kubeflow Pipelines endpoint: pass --host or set KF_PIPELINES_ENDPOINT"
        )
    kwargs: dict[str, Any] = {"host": target.host}
    if target.namespace:
        kwargs["namespace"] = target.namespace
    token = os.environ.get("KF_PIPELINES_TOKEN")
    if token:
        kwargs["existing_token"] = token
    elif target.token_file:
        if not os.path.isfile(target.token_file):
            raise ConfigError(
                f"{target.token_file}: no such token file (--token-file or "
                "KF_PIPELINES_SA_TOKEN_PATH)"
            )
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        kwargs["credentials"] = ServiceAccountTokenVolumeCredentials(target.token_file)
    cookies = os.environ.get("KF_PIPELINES_COOKIES")
    if cookies:
        kwargs["cookies"] = cookies
    return kfp.Client(**kwargs)


def _existing(client: Any, experiment_id: str, job_name: str) -> list[Any]:
    name_is = json.dumps(
        {"predicates": [{"operation": "EQUALS", "key": "display_name", "stringValue": job_name}]}
    )
    found, token = [], ""
    while True:
        page = client.list_recurring_runs(
            experiment_id=experiment_id, filter=name_is, page_size=100, page_token=token
        )
        # Filter again here: a server that ignores the filter must not get a run deleted.
        found += [r for r in page.recurring_runs or [] if r.display_name == job_name]
        token = page.next_page_token or ""
        if not token:
            return found


def schedule(
    cron: str,
    arguments: dict[str, Any],
    target: ScheduleTarget,
    pipeline_yaml: str | None = None,
    image: str | None = None,
    replace: bool = False,
    client: Any = None,
) -> dict[str, Any]:
    """Create the recurring run ``target.job_name`` in ``target.experiment``.

    ``cron`` has five fields ("0 3 * * *") or KFP's six (seconds first). One run at a time
    (``max_concurrency=1``: deploys into one store must not overlap) and no catch-up, so a
    paused or broken schedule does not fire a backlog. ``pipeline_yaml``: a compiled
    pipeline; by default it is compiled here, which needs ``image`` (or ``$GENCO_IMAGE``).
    An existing recurring run of that name is refused unless ``replace``.
    """
    from genco.pipeline.runner import compile_pipeline

    spec_cron = kfp_cron(cron)
    target = target.from_env()
    # kfp.Client prints "Experiment details: URL" lines to stdout, where the CLI writes its
    # JSON: they are kept and returned as links instead.
    printed = io.StringIO()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(printed):
        # Compile first: a missing image is refused before any request.
        package = pipeline_yaml or compile_pipeline(os.path.join(tmp, "retraining.yaml"), image)
        client = client or kfp_client(target)
        exp = client.create_experiment(name=target.experiment, namespace=target.namespace)
        existing = _existing(client, exp.experiment_id, target.job_name)
        if existing and not replace:
            ids = ", ".join(str(r.recurring_run_id) for r in existing)
            raise ConfigError(
                f"recurring run '{target.job_name}' already exists in experiment "
                f"'{target.experiment}' (id {ids}); pass --replace to update it, or choose "
                "another --job-name"
            )
        for run in existing:
            client.delete_recurring_run(run.recurring_run_id)
        run = client.create_recurring_run(
            experiment_id=exp.experiment_id,
            job_name=target.job_name,
            cron_expression=spec_cron,
            max_concurrency=1,
            no_catchup=True,
            params=arguments,
            pipeline_package_path=package,
            enable_caching=True,
            pipeline_root=target.pipeline_root,
            service_account=target.service_account,
        )
    return {
        "experiment_id": str(exp.experiment_id),
        "recurring_run_id": str(getattr(run, "recurring_run_id", "")),
        "cron": spec_cron,
        "replaced": [str(r.recurring_run_id) for r in existing],
        "namespace": target.namespace,
        "service_account": target.service_account,
        "pipeline_root": target.pipeline_root,
        "links": [line.split(": ", 1)[-1] for line in printed.getvalue().splitlines() if line],
    }
