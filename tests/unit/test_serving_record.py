"""The serving record (models/<name>/serving.json) that `llmflow up` restores from, and the
same applications rendered into a KubeRay RayService manifest."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from llmflow import aliases
from llmflow.config import ClusterConfig, ServeConfig
from llmflow.errors import ConfigError, LlmflowError
from llmflow.promote import kuberay, serving
from llmflow.promote.apps import app_args
from llmflow.registry import register_version
from llmflow.store import Store

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def store(tmp_path):
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"weights")
    store = Store(tmp_path / "store")
    for name in ("a", "b"):
        for _ in range(2):
            register_version(store, name, d, base_model="tiny")
    return store


def _ref(store, name, version):
    from llmflow.registry import get_version

    return get_version(store, name, version)


def test_a_record_holds_the_served_version_and_the_engine_auto_chose(store):
    cfg = ServeConfig(app_name="a-app", route_prefix="/a", engine="auto", max_batch_size=8)
    serving.record(store, _ref(store, "a", "v1"), cfg, ClusterConfig(), engine="hf")
    aliases.set_champion(store, "a", "v1")
    [served] = serving.recorded(store)
    assert (served.name, served.version, served.serve.app_name) == ("a", "v1", "a-app")
    assert served.serve.engine == "hf" and served.serve.max_batch_size == 8
    # The champion alias wins over the record's version (it is what a promotion moves last).
    aliases.set_champion(store, "a", "v2")
    assert serving.recorded(store)[0].version == "v2"
    assert serving.forget(store, "a") and serving.recorded(store) == []
    assert not serving.forget(store, "a")


def test_two_models_recorded_on_one_app_the_later_is_served(store):
    shared = ServeConfig(app_name="shared", route_prefix="/s")
    serving.record(store, _ref(store, "a", "v1"), shared, ClusterConfig(), engine="hf")
    serving.record(store, _ref(store, "b", "v2"), shared, ClusterConfig(), engine="hf")
    own = ServeConfig(app_name="b-own", route_prefix="/b")
    assert [(s.name, s.version) for s in serving.recorded(store)] == [("b", "v2")]
    serving.record(store, _ref(store, "b", "v2"), own, ClusterConfig(), engine="hf")
    assert sorted((s.name, s.serve.app_name) for s in serving.recorded(store)) == [
        ("a", "shared"),
        ("b", "b-own"),
    ]


def test_a_broken_record_is_one_error_naming_the_file(store):
    store.write_json(
        {"version": "v1", "serve": {"max_batch_size": "many"}}, "models", "a", "serving.json"
    )
    with pytest.raises(LlmflowError, match=r"models/a/serving.json: not a serving record"):
        serving.recorded(store)


def test_the_applications_are_what_the_promotion_deployed(store):
    cfg = ServeConfig(app_name="a-app", route_prefix="/a")
    serving.record(store, _ref(store, "a", "v2"), cfg, ClusterConfig(), engine="hf")
    [app] = serving.serve_applications(store)
    assert app["import_path"] == "deployments.openai_app:build_app"
    assert (app["name"], app["route_prefix"]) == ("a-app", "/a")
    assert app["args"] == app_args(cfg, _ref(store, "a", "v2"))
    assert app["args"]["version"] == "v2"


def test_the_rayservice_manifest_gets_the_same_applications_and_keeps_the_rest(store, tmp_path):
    from ray.serve.schema import ServeDeploySchema

    serving.record(
        store, _ref(store, "a", "v2"), ServeConfig(app_name="llmflow"), ClusterConfig(), "hf"
    )
    serving.record(
        store,
        _ref(store, "b", "v1"),
        ServeConfig(app_name="b", route_prefix="/b"),
        ClusterConfig(),
        "hf",
    )
    apps = serving.serve_applications(store)
    manifest = tmp_path / "rayservice.yaml"
    shutil.copy(ROOT / "infra/k8s/rayservice.yaml", manifest)
    before = manifest.read_text()
    kuberay.set_applications(manifest, apps)
    after = manifest.read_text()

    config = kuberay.serve_config(after)
    assert config["applications"] == apps
    ServeDeploySchema.model_validate(config)  # Ray's own check of a serve config
    old = kuberay.serve_config(before)
    assert {k: v for k, v in config.items() if k != "applications"} == {
        k: v for k, v in old.items() if k != "applications"
    }
    # Everything outside serveConfigV2 is as it was, comments included.
    strip = [d for d in yaml.safe_load_all(after) if d]
    orig = [d for d in yaml.safe_load_all(before) if d]
    for d in (*strip, *orig):
        d["spec"].pop("serveConfigV2")
    assert strip == orig
    assert [line for line in after.splitlines() if line.lstrip().startswith("#")] == [
        line for line in before.splitlines() if line.lstrip().startswith("#")
    ]


def test_a_manifest_without_serve_config_is_refused(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    with pytest.raises(ConfigError, match=r"no 'serveConfigV2: \|' block"):
        kuberay.set_applications(path, [])


def test_a_rollout_waits_until_the_ingress_routes_the_app_and_names_a_route_never_taken():
    """Serve says RUNNING before HAProxy's reload has the route: the wait reads the
    ingress's own /-/routes until the prefix maps to the app (here after three reads)."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from llmflow.promote.rollout import RolloutError, wait_routed

    reads = []

    class Ingress(BaseHTTPRequestHandler):
        def do_GET(self):
            reads.append(self.path)
            table = {"/other": "other"} if len(reads) < 3 else {"/secret/": "secret-test"}
            body = json.dumps(table).encode()
            self.send_response(200 if self.path == "/-/routes" else 404)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Ingress)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        wait_routed(base, "/secret", "secret-test", timeout_s=10)
        assert reads == ["/-/routes"] * 3
        with pytest.raises(RolloutError, match=r"does not route /chat to it after 1s"):
            wait_routed(base, "/chat", "chat", timeout_s=1)
    finally:
        server.shutdown()
