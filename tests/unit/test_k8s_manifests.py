"""infra/k8s is code too: the core objects validate against the Kubernetes API's schemas
(kubernetes-validate, which ships them: offline), RayCluster and RayService against KubeRay's
CRD schemas (infra/k8s/crds), the Helm values against the chart's values schema, and the
pieces agree with each other and with infra/k8s/prefect.yaml: image, namespace, accounts,
Secrets, the Ray head's address, the work pool's job template."""

from __future__ import annotations

import copy
import json
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "infra/k8s"
KUBERNETES_VERSION = "1.33.0"  # the oldest Kubernetes the manifests are checked against

MANIFEST_FILES = ["namespace.yaml", "prefect-worker.yaml", "raycluster.yaml", "rayservice.yaml"]
OBJECTS = [
    (f, doc) for f in MANIFEST_FILES for doc in yaml.safe_load_all((K8S / f).read_text()) if doc
]
CORE = [(f, o) for f, o in OBJECTS if not o["apiVersion"].startswith("ray.io/")]
CRDS = {"RayCluster": "ray.io_rayclusters.v1.json", "RayService": "ray.io_rayservices.v1.json"}

POOL = yaml.safe_load((K8S / "prefect.yaml").read_text())["definitions"]["work_pools"]["kubernetes"]
JOB_VARIABLES = POOL["job_variables"]
TEMPLATE = json.loads((K8S / "base-job-template.json").read_text())


def the(kind: str, name: str | None = None) -> dict:
    [obj] = [o for _, o in OBJECTS if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    return obj


def _id(item) -> str:
    f, o = item
    return f"{f}:{o['kind']}/{o['metadata']['name']}"


# -- schemas ---------------------------------------------------------------------------------
@pytest.mark.parametrize("item", CORE, ids=_id)
def test_core_objects_are_valid_kubernetes(item):
    import kubernetes_validate

    _, obj = item
    # strict: an unknown (say, misspelt) field is an error, as with `kubectl apply`.
    kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def strict(schema: dict) -> dict:
    """The CRD schema as the API server applies it with strict field validation: an object
    with declared properties takes no others (unless it says it preserves unknown fields)."""
    schema = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if (
                "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")
            ):
                node["additionalProperties"] = False
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return schema


def crd_validator(kind: str) -> jsonschema.Validator:
    schema = json.loads((K8S / "crds" / CRDS[kind]).read_text())
    return jsonschema.Draft7Validator(strict(schema))


@pytest.mark.parametrize("kind", sorted(CRDS))
def test_kuberay_objects_match_the_crd_schemas(kind):
    obj = the(kind)
    assert obj["apiVersion"] == "ray.io/v1"
    errors = [
        f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
        for e in crd_validator(kind).iter_errors(obj)
    ]
    assert not errors, errors


def test_the_crd_check_rejects_a_misspelt_field():
    bad = copy.deepcopy(the("RayCluster"))
    bad["spec"]["workerGroupSpecs"][0]["maxReplica"] = bad["spec"]["workerGroupSpecs"][0].pop(
        "maxReplicas"
    )
    assert any("maxReplica" in e.message for e in crd_validator("RayCluster").iter_errors(bad))


@pytest.mark.parametrize(
    "values", ["prefect-server.values.yaml", "prefect-server.external-db.values.yaml"]
)
def test_helm_values_match_the_prefect_server_chart(values):
    schema = json.loads((K8S / "helm/prefect-server.values.schema.json").read_text())
    data = yaml.safe_load((K8S / "helm" / values).read_text())
    jsonschema.Draft7Validator(schema).validate(data)

    # The chart's schema admits unknown keys; a misspelt one would be silently ignored.
    def unknown(node, sub, path):
        for key, value in node.items():
            if path == "" and key == "postgresql":
                continue  # the Bitnami subchart's values, not in this chart's schema
            props = sub.get("properties", {})
            assert key in props, f"{values}: {path}{key} is not a value of the chart"
            if isinstance(value, dict) and props[key].get("properties"):
                unknown(value, props[key], f"{path}{key}.")

    unknown(data, schema, "")


# -- the work pool's base job template -------------------------------------------------------
def prefect_default_template() -> dict:
    """The Kubernetes work pool's default base job template as this Prefect server hands it
    to `prefect work-pool create --type kubernetes`."""
    import prefect

    views = Path(prefect.__file__).parent / "server/api/collections_data/views"
    meta = json.loads((views / "aggregate-worker-metadata.json").read_text())
    return meta["prefect-kubernetes"]["kubernetes"]["default_base_job_configuration"]


def test_base_job_template_is_prefects_default_with_our_values_filled_in():
    default, ours = prefect_default_template(), copy.deepcopy(TEMPLATE)
    # 1. variables: the same schema; the defaults of prefect.yaml's job variables are its
    #    values (a pool created from this template runs a bare deployment the same way).
    for name, value in JOB_VARIABLES.items():
        prop, original = (
            ours["variables"]["properties"][name],
            default["variables"]["properties"][name],
        )
        assert prop.pop("default") == value, name
        if "default" in original:
            prop["default"] = original["default"]
    assert ours["variables"] == default["variables"]
    # 2. the Job: the container's env is a list holding the Secrets (the worker prepends the
    #    `env` variable to it), and parallelism/completions sit in the Job's spec, where they
    #    mean something (the default puts them in the pod spec; the API server drops them).
    job = ours["job_configuration"]["job_manifest"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    secrets = {
        e["name"]: e["valueFrom"]["secretKeyRef"]["name"]
        for e in container["env"]
        if "valueFrom" in e
    }
    assert secrets == {
        "RAY_AUTH_TOKEN": "llmflow-ray-token",
        "AWS_ACCESS_KEY_ID": "llmflow-s3",
        "AWS_SECRET_ACCESS_KEY": "llmflow-s3",
        "AWS_ENDPOINT_URL_S3": "llmflow-s3",
        "HF_TOKEN": "llmflow-hf",  # the flow's process fetches a hub base model (issue 30)
    }
    container["env"] = "{{ env }}"
    job["template"]["spec"].update(
        parallelism=job.pop("parallelism"), completions=job.pop("completions")
    )
    assert ours["job_configuration"] == default["job_configuration"]


def test_the_prefect_server_accepts_the_template_for_a_kubernetes_pool():
    from prefect.server.schemas.actions import WorkPoolCreate

    # What `prefect work-pool create --base-job-template` sends: every placeholder must name a
    # variable, and the variables must form a valid schema.
    WorkPoolCreate(name="llmflow-k8s", type="kubernetes", base_job_template=TEMPLATE)


def test_prefect_yaml_job_variables_fit_the_template():
    variables = TEMPLATE["variables"]
    jsonschema.Draft7Validator(variables).validate(JOB_VARIABLES)
    for name, value in JOB_VARIABLES.items():
        assert variables["properties"][name].get("default") == value, name


def rendered_job(values: dict) -> dict:
    """The Job the Kubernetes worker submits: Prefect's templating, then the worker's env
    handling (the `env` variable as a list, ahead of the template's own entries)."""
    from prefect.utilities.templating import apply_values

    props = TEMPLATE["variables"]["properties"]
    variables = {k: p["default"] for k, p in props.items() if "default" in p} | values
    config = apply_values(TEMPLATE["job_configuration"], variables)
    job = config["job_manifest"]
    container = job["spec"]["template"]["spec"]["containers"][0]
    env = [{"name": k, "value": v} for k, v in config["env"].items()]
    container["env"] = env + [e for e in container["env"] if e["name"] not in config["env"]]
    container["args"] = shlex.split(container["args"])  # as the worker's command_from_string
    return job


def test_the_rendered_job_is_a_valid_kubernetes_job():
    import kubernetes_validate

    job = rendered_job(
        {
            "name": "pipeline-k8s-abc12",
            "command": "prefect flow-run execute",
            "labels": {"prefect.io/flow-run-id": "0000"},
        }
    )
    assert job["spec"]["template"]["spec"]["containers"][0]["args"] == [
        "prefect",
        "flow-run",
        "execute",
    ]
    kubernetes_validate.validate(job, KUBERNETES_VERSION, strict=True)
    pod = job["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert job["metadata"]["namespace"] == the("Namespace")["metadata"]["name"]
    assert pod["serviceAccountName"] == JOB_VARIABLES["service_account_name"]
    assert container["image"] == JOB_VARIABLES["image"]
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    env = {e["name"]: e for e in container["env"]}
    assert env["LLMFLOW_RAY_ADDRESS"]["value"] == JOB_VARIABLES["env"]["LLMFLOW_RAY_ADDRESS"]
    assert env["RAY_AUTH_MODE"]["value"] == "token" and "valueFrom" in env["RAY_AUTH_TOKEN"]


# -- the pieces fit --------------------------------------------------------------------------
def ray_containers(spec: dict) -> list[tuple[str, dict]]:
    groups = [("head", spec["headGroupSpec"])] + [
        (g["groupName"], g) for g in spec["workerGroupSpecs"]
    ]
    return [(name, c) for name, g in groups for c in g["template"]["spec"]["containers"]]


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def test_every_object_lives_in_the_pools_namespace_and_uses_accounts_that_exist():
    namespace = JOB_VARIABLES["namespace"]
    assert the("Namespace")["metadata"]["name"] == namespace
    assert all(
        o["metadata"]["namespace"] == namespace for _, o in OBJECTS if o["kind"] != "Namespace"
    )
    accounts = {o["metadata"]["name"] for _, o in OBJECTS if o["kind"] == "ServiceAccount"}
    assert JOB_VARIABLES["service_account_name"] in accounts
    worker = the("Deployment", "prefect-worker")["spec"]["template"]["spec"]
    binding = the("RoleBinding")
    assert worker["serviceAccountName"] in accounts
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": worker["serviceAccountName"], "namespace": namespace}
    ]
    assert binding["roleRef"]["name"] == the("Role")["metadata"]["name"]
    for kind in CRDS:
        spec = the(kind)["spec"]
        spec = spec.get("rayClusterConfig", spec)
        groups = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
        assert {g["template"]["spec"]["serviceAccountName"] for g in groups} <= accounts


def test_flow_runs_reach_the_ray_head_and_serve_at_the_clusters_service():
    cluster = the("RayCluster")
    head = cluster["spec"]["headGroupSpec"]
    # KubeRay names the head Service <cluster>-head-svc unless headService.name says otherwise.
    service = (head.get("headService") or {}).get("metadata", {}).get(
        "name"
    ) or f"{cluster['metadata']['name']}-head-svc"
    ports = {p["containerPort"] for c in head["template"]["spec"]["containers"] for p in c["ports"]}
    env = JOB_VARIABLES["env"]
    for key, scheme in (("LLMFLOW_RAY_ADDRESS", "ray"), ("LLMFLOW_SERVE_URL", "http")):
        url = urlsplit(env[key])
        assert url.scheme == scheme, key
        assert url.hostname == f"{service}.{cluster['metadata']['namespace']}.svc", key
        assert url.port in ports, key


def test_ray_nodes_and_pods_run_the_image_with_the_stores_and_tokens_of_the_flow_runs():
    image = JOB_VARIABLES["image"]
    assert (
        the("Deployment", "prefect-worker")["spec"]["template"]["spec"]["containers"][0]["image"]
        == image
    )
    token_secret = the("RayCluster")["spec"]["authOptions"]["secretName"]
    assert (
        token_secret == the("RayService")["spec"]["rayClusterConfig"]["authOptions"]["secretName"]
    )
    [template_token] = [
        e
        for e in TEMPLATE["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
            "containers"
        ][0]["env"]
        if e["name"] == "RAY_AUTH_TOKEN"
    ]
    assert template_token["valueFrom"]["secretKeyRef"] == {
        "name": token_secret,
        "key": "auth_token",
    }
    for kind in CRDS:
        spec = the(kind)["spec"]
        spec = spec.get("rayClusterConfig", spec)
        assert spec["authOptions"]["mode"] == "token"
        for group, container in ray_containers(spec):
            env = env_of(container)
            assert container["image"] == (f"{image}-cuda" if group == "gpu" else image), (
                kind,
                group,
            )
            assert env["RAY_AUTH_MODE"]["value"] == "token"
            assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == token_secret
            if kind == "RayCluster":  # the RayService reads its model from a full URI
                assert env["LLMFLOW_STORE"]["value"] == JOB_VARIABLES["env"]["LLMFLOW_STORE"]
            assert container["resources"]["requests"] and container["resources"]["limits"]


def test_the_gpu_group_asks_for_one_gpu_a_pod():
    [gpu] = [g for g in the("RayCluster")["spec"]["workerGroupSpecs"] if g["groupName"] == "gpu"]
    [container] = gpu["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert gpu["minReplicas"] == 0  # GPUs cost money while idle: the autoscaler adds them
    # The custom resource the local stack's extra node declares (KubeRay's quoting: a JSON
    # string inside a string), so one train.resources_per_worker works on both.
    from llmflow.stack import NODE_RESOURCE

    assert json.loads(json.loads(gpu["rayStartParams"]["resources"])) == {NODE_RESOURCE: 1}


def test_the_worker_talks_to_the_helm_released_server_with_its_auth_secret():
    values = yaml.safe_load((K8S / "helm/prefect-server.values.yaml").read_text())
    [container] = the("Deployment", "prefect-worker")["spec"]["template"]["spec"]["containers"]
    env = env_of(container)
    namespace = JOB_VARIABLES["namespace"]
    assert env["PREFECT_API_URL"]["value"] == (
        f"http://{values['fullnameOverride']}.{namespace}.svc:4200{values.get('server', {}).get('apiBasePath', '/api')}"
    )
    secret = env["PREFECT_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"]
    assert values["server"]["basicAuth"] == {"enabled": True, "existingSecret": secret["name"]}
    assert secret["key"] == "auth-string"  # the key the chart reads
    assert container["command"][:3] == ["prefect", "worker", "start"]
    assert container["command"][container["command"].index("--type") + 1] == "kubernetes"


def test_the_rayservice_deploys_the_openai_app_with_arguments_it_accepts():
    import inspect

    from ray.serve.schema import ServeDeploySchema

    from deployments import openai_app
    from llmflow.config import ServeConfig

    config = yaml.safe_load(the("RayService")["spec"]["serveConfigV2"])
    ServeDeploySchema.model_validate(config)  # Ray's own check of a serve config
    [app] = config["applications"]
    module, attr = app["import_path"].split(":")
    assert module == "deployments.openai_app" and getattr(openai_app, attr) is openai_app.build_app
    assert (app["name"], app["route_prefix"]) == (
        ServeConfig().app_name,
        ServeConfig().route_prefix,
    )
    _, kwargs = openai_app.deployment_options(app["args"])
    # The replica class under Serve's ingress wrapper: its constructor's parameters.
    server_cls = openai_app.OpenAIServer.func_or_class.__mro__[1]
    params = inspect.signature(server_cls.__init__).parameters
    assert set(kwargs) <= set(params), set(kwargs) - set(params)
    assert app["args"]["model_path"].startswith(JOB_VARIABLES["env"]["LLMFLOW_STORE"] + "/models/")


def both_manifests_ray_containers():
    """(kind, container) of every Ray pod of both manifests (ray_containers of each)."""
    for kind in ("RayCluster", "RayService"):
        spec = the(kind)["spec"]
        for _, container in ray_containers(spec.get("rayClusterConfig", spec)):
            yield kind, container


def test_the_ray_pods_get_the_secrets_from_kubernetes_secrets_not_from_runs():
    """The flows' runtime_env no longer carries the Prefect credentials (Ray logs its values):
    every Ray pod of both manifests reads them, and the hub token, from Secrets."""
    for kind, container in both_manifests_ray_containers():
        env = env_of(container)
        for var, secret in (
            ("PREFECT_API_AUTH_STRING", "prefect-basic-auth"),
            ("HF_TOKEN", "llmflow-hf"),
        ):
            ref = env[var]["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret and ref["optional"] is True, (kind, var)
            assert "value" not in env[var]


def test_the_ray_pods_run_serve_behind_haproxy_as_the_local_stack_does(monkeypatch):
    from llmflow.settings import StackSettings

    monkeypatch.delenv("LLMFLOW_SERVE_INGRESS", raising=False)
    local = StackSettings.from_env().serve_ingress_env()
    for kind, container in both_manifests_ray_containers():
        env = env_of(container)
        for var in ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_THROUGHPUT_OPTIMIZED"):
            assert env[var]["value"] == local[var] == "1", (kind, var)
