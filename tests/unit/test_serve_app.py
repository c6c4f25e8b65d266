"""Serve applications built from the config, without starting Ray: replicas or autoscaling,
batching room, and the vllm app's LLMConfig and declarative application (built as plain data:
ray.serve.llm runs only in the vLLM engine environment)."""

from __future__ import annotations

import pytest

from llmflow.configfile import load_config
from llmflow.errors import ConfigError
from llmflow.refs import ModelRef

MODEL = ModelRef(
    uri="/store/models/m/3", name="m", version="3", base_model="tiny", dataset_sha256="abc"
)
AUTOSCALING = [
    "serve.autoscaling.min_replicas=1",
    "serve.autoscaling.max_replicas=3",
    "serve.autoscaling.target_ongoing_requests=4",
]


def _serve(*overrides: str):
    return load_config(None, list(overrides)).serve


def test_fixed_replicas_reach_the_deployment():
    from deployments.openai_app import build_app, deployment_options
    from llmflow.promote.apps import app_args

    args = app_args(_serve("serve.num_replicas=2", "serve.max_batch_size=8"), MODEL)
    options, kwargs = deployment_options(args)
    assert options["num_replicas"] == 2 and "autoscaling_config" not in options
    # Serve's default of 5 ongoing requests would cap each batch at 5.
    assert options["max_ongoing_requests"] == 16
    # Serve's default surge of 0 stops the old replica before its replacement has loaded.
    assert options["max_surge_percent"] == 100
    assert kwargs["max_batch_size"] == 8 and "num_replicas" not in kwargs
    deployment = build_app(args)._bound_deployment
    assert deployment.num_replicas == 2 and deployment.max_ongoing_requests == 16
    assert deployment._deployment_config.autoscaling_config is None
    assert deployment._deployment_config.max_surge_percent == 100
    no_surge = app_args(_serve("serve.max_surge_percent=0"), MODEL)
    assert build_app(no_surge)._bound_deployment._deployment_config.max_surge_percent == 0


def test_autoscaling_from_the_config_replaces_num_replicas():
    from deployments.openai_app import build_app, deployment_options
    from llmflow.promote.apps import app_args

    args = app_args(_serve("serve.num_replicas=2", *AUTOSCALING), MODEL)
    options, kwargs = deployment_options(args)
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 3,
        "target_ongoing_requests": 4.0,
    }
    assert "num_replicas" not in options and "num_replicas" not in kwargs
    config = build_app(args)._bound_deployment._deployment_config
    assert "num_replicas" not in config.user_configured_option_names  # Serve refuses both
    auto = config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 3, 4.0)


def test_deployment_options_split_and_override():
    from deployments.openai_app import deployment_options

    options, kwargs = deployment_options(
        {
            "model_path": "/m",
            "model_name": "m",
            "num_replicas": 1,
            "autoscaling_config": {"min_replicas": 0, "max_replicas": 2},
            "max_ongoing_requests": 5,
            "num_cpus": 2,
            "runtime_env": {"env_vars": {"K": "v"}},
        }
    )
    assert kwargs == {"model_path": "/m", "model_name": "m"}
    assert options == {
        "autoscaling_config": {"min_replicas": 0, "max_replicas": 2},
        "max_ongoing_requests": 5,
        "ray_actor_options": {"num_cpus": 2.0, "runtime_env": {"env_vars": {"K": "v"}}},
    }


def test_autoscaling_bounds_are_checked():
    with pytest.raises(ConfigError, match="min_replicas \\(3\\) is above max_replicas \\(2\\)"):
        _serve("serve.autoscaling.min_replicas=3", "serve.autoscaling.max_replicas=2")


def test_llm_config_for_vllm():
    from deployments.vllm_app import llm_config
    from llmflow.promote.apps import vllm_app_args

    serve_cfg = _serve(
        *AUTOSCALING,
        "serve.accelerator_type=A10G",
        "serve.vllm_engine_kwargs={max_model_len: 512, enforce_eager: true}",
    )
    config = llm_config(vllm_app_args(serve_cfg, MODEL))
    assert config == {
        "model_loading_config": {"model_id": "m", "model_source": "/store/models/m/3"},
        "engine_kwargs": {"max_model_len": 512, "enforce_eager": True},
        "deployment_config": {
            "autoscaling_config": {
                "min_replicas": 1,
                "max_replicas": 3,
                "target_ongoing_requests": 4.0,
            },
            "max_surge_percent": 100,
        },
        "accelerator_type": "A10G",
        # a path read in place: no node initialization (a download task per engine start)
        "callback_config": {"callback_class": "deployments.vllm_ingress:WeightsInPlace"},
    }
    fixed = llm_config(
        vllm_app_args(
            _serve("serve.num_replicas=2"),
            MODEL.model_copy(update={"uri": "s3://bucket/models/m/3/"}),
        )
    )
    assert fixed["deployment_config"] == {"num_replicas": 2, "max_surge_percent": 100}
    assert fixed["model_loading_config"]["model_source"] == {"bucket_uri": "s3://bucket/models/m/3"}
    assert "accelerator_type" not in fixed
    assert "callback_config" not in fixed  # the download task mirrors the bucket
    assert llm_config({"model_path": "file:///m", "model_name": "m"})["model_loading_config"] == {
        "model_id": "m",
        "model_source": "/m",
    }
    with pytest.raises(ValueError, match="local paths or s3://"):
        llm_config({"model_path": "memory://m", "model_name": "m"})


def test_llm_config_on_cpus_places_replicas_by_the_bundles():
    from deployments.vllm_app import llm_config
    from llmflow.promote.apps import vllm_app_args

    tiny = load_config("configs/tiny.yaml").serve
    config = llm_config(vllm_app_args(tiny, MODEL))
    assert config["placement_group_config"] == {"bundles": [{"CPU": 1.0}]}
    assert config["accelerator_config"] == {"kind": "cpu"}
    # The bundles are the replica's whole footprint: its actor adds no CPU of its own.
    assert config["deployment_config"]["ray_actor_options"] == {"num_cpus": 0}
    assert config["engine_kwargs"]["kv_cache_memory_bytes"] == 64 * 2**20
    gpus = llm_config(
        vllm_app_args(
            _serve("serve.vllm_placement=[{GPU: 1}, {GPU: 1}]", "serve.accelerator_type=A10G"),
            MODEL,
        )
    )
    assert "accelerator_config" not in gpus and gpus["accelerator_type"] == "A10G"
    assert "ray_actor_options" not in gpus["deployment_config"]
    assert "callback_config" not in gpus  # two bundles may span nodes: the task prepares each
    assert config["callback_config"]["callback_class"] == "deployments.vllm_ingress:WeightsInPlace"
    with pytest.raises(ValueError, match="accelerator_type: a GPU type, but serve.vllm_placement"):
        llm_config(vllm_app_args(tiny.model_copy(update={"accelerator_type": "A10G"}), MODEL))


def test_llm_config_validates_as_ray_serve_llm_config():
    """ray.serve.llm needs vllm to import; its LLMConfig model itself does not."""
    try:
        from ray.llm._internal.serve.core.configs.llm_config import LLMConfig
    except ImportError as exc:  # a Ray version that moved it: the check above still holds
        pytest.skip(f"ray's LLMConfig model is not importable here: {exc}")
    from deployments.vllm_app import llm_config

    config = LLMConfig(
        **llm_config(
            {
                "model_path": "/m",
                "model_name": "m",
                "num_replicas": 2,
                "max_ongoing_requests": 64,
                "max_surge_percent": 0,
                "accelerator_type": "H100",
                "engine_kwargs": {"max_model_len": 512},
            }
        )
    )
    assert config.model_id == "m" and config.model_loading_config.model_source == "/m"
    assert config.callback_config.callback_class == "deployments.vllm_ingress:WeightsInPlace"
    assert config.deployment_config == {
        "num_replicas": 2,
        "max_ongoing_requests": 64,
        "max_surge_percent": 0,
    }
    assert config.accelerator_type == "H100" and config.max_request_context_length == 512


def test_engine_choice(monkeypatch):
    import sys

    from llmflow import engines
    from llmflow.config import ClusterConfig
    from llmflow.promote import apps as rollout

    tiny = load_config("configs/tiny.yaml").serve
    auto = tiny.model_copy(update={"engine": "auto"})
    assert rollout.serve_engine(tiny) == "hf"  # tiny.yaml says hf
    assert rollout.serve_engine(auto) == "vllm"  # .venv-vllm is healthy, CPU bundles place
    monkeypatch.setenv("LLMFLOW_VLLM_PYTHON", sys.executable)  # Ray, but no vllm
    no_vllm = ClusterConfig()
    assert rollout.serve_engine(auto, no_vllm) == "hf"
    with pytest.raises(
        ConfigError, match="^serve.engine: 'vllm' needs the vLLM engine environment"
    ):
        rollout.serve_engine(_serve("serve.engine=vllm"), no_vllm)
    monkeypatch.delenv("LLMFLOW_VLLM_PYTHON")
    monkeypatch.setattr(engines, "cuda_available", lambda: False)
    assert rollout.serve_engine(_serve("serve.engine=auto")) == "hf"  # a GPU bundle, no GPU


def test_the_vllm_app_is_declarative_in_the_engine_environment_and_no_key_travels():
    from llmflow.promote import apps as rollout

    serve_cfg = load_config(
        "configs/tiny.yaml",
        ["serve.engine=vllm", "serve.route_prefix=/v", "serve.api_key_env=MY_KEY"],
    ).serve
    app = rollout.vllm_app_schema(serve_cfg, MODEL)
    assert app["import_path"] == "deployments.vllm_app:build_app" and app["route_prefix"] == "/v"
    assert app["runtime_env"]["py_executable"].endswith(".venv-vllm/bin/python")
    assert app["args"]["api_key_env"] == "MY_KEY" and app["args"]["version"] == "3"
    from ray.serve.schema import ServeApplicationSchema

    ServeApplicationSchema(**app)  # what the controller is given validates
    with pytest.raises(ConfigError, match="accelerator_type: a GPU type"):
        rollout.vllm_app_schema(serve_cfg.model_copy(update={"accelerator_type": "A10G"}), MODEL)


def test_the_smoke_test_calls_the_configured_clusters_serve_url(monkeypatch):
    """cluster.serve_url, not 127.0.0.1: a remote cluster's healthy version must not be rolled
    back because the smoke test asked this machine. A stand-in for the remote proxy answers."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from llmflow.config import ClusterConfig
    from tasks.promote import check_served

    monkeypatch.delenv("LLMFLOW_SERVE_URL", raising=False)
    paths: list[str] = []

    class Remote(BaseHTTPRequestHandler):
        def _send(self, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            paths.append(self.path)
            self._send({"data": [{"id": "m", "version": "3"}]})

        def do_POST(self):
            paths.append(self.path)
            self.rfile.read(int(self.headers["content-length"]))
            self._send(
                {"choices": [{"message": {"content": "4321"}}], "usage": {"completion_tokens": 2}}
            )

        def log_message(self, *_):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Remote)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        cluster = ClusterConfig(serve_url=f"http://127.0.0.1:{server.server_port}")
        result = check_served.fn(_serve("serve.route_prefix=/remote"), cluster, MODEL)
    finally:
        server.shutdown()
    assert result.passed, result.checks
    assert paths[0] == "/remote/v1/models" and paths[1] == "/remote/v1/chat/completions"


def test_a_key_source_without_a_key_fails_before_any_work(tmp_path, monkeypatch):
    from llmflow.config import ClusterConfig
    from llmflow.promote.apps import check_api_key_source

    monkeypatch.delenv("NO_SUCH_KEY_VAR", raising=False)
    local = ClusterConfig()
    with pytest.raises(
        ConfigError, match="^serve.api_key_env: environment variable NO_SUCH_KEY_VAR is not set$"
    ):
        check_api_key_source(_serve("serve.api_key_env=NO_SUCH_KEY_VAR"), local)
    empty = tmp_path / "key"
    empty.write_text("\n")
    with pytest.raises(ConfigError, match=f"^serve.api_key_file: {empty} is empty$"):
        check_api_key_source(_serve(f"serve.api_key_file={empty}"), local)
    check_api_key_source(_serve(), local)  # no key configured: nothing to check
    # A remote cluster's nodes hold the key: not checkable from here, so not refused.
    check_api_key_source(
        _serve("serve.api_key_env=NO_SUCH_KEY_VAR"), ClusterConfig(ray_address="ray://h:10001")
    )


def test_start_attempts_reach_both_apps_as_serves_constructor_retries():
    """serve.start_attempts: how many failed starts of a replica Serve makes before the
    deployment fails (and the rollout rolls back); empty leaves Serve's default."""
    from ray.serve._private.config import DeploymentConfig  # what LLMConfig validates with

    from deployments.openai_app import deployment_options
    from deployments.vllm_app import llm_config
    from llmflow.promote.apps import app_args, vllm_app_args

    once = _serve("serve.start_attempts=1")
    options, kwargs = deployment_options(app_args(once, MODEL))
    assert options["max_constructor_retry_count"] == 1
    assert "max_constructor_retry_count" not in kwargs
    vllm = llm_config(vllm_app_args(once, MODEL))["deployment_config"]
    assert vllm["max_constructor_retry_count"] == 1
    assert DeploymentConfig(**vllm).max_constructor_retry_count == 1
    default = _serve()
    assert "max_constructor_retry_count" not in deployment_options(app_args(default, MODEL))[0]
    assert (
        "max_constructor_retry_count"
        not in llm_config(vllm_app_args(default, MODEL))["deployment_config"]
    )
    with pytest.raises(ConfigError, match="serve.start_attempts"):
        _serve("serve.start_attempts=0")
