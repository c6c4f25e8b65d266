"""Security defaults of model loading: no remote code is ever run, and weights come only
from safetensors (a pickle is never unpickled), in every place llmflow loads a model."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


class Evil:
    """Unpickling this creates the marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from llmflow.basemodels import resolve_base_model
    from llmflow.config import TrainConfig
    from llmflow.store import Store

    return Path(resolve_base_model(TrainConfig(), Store(tmp_path_factory.mktemp("store"))))


def test_remote_code_in_a_model_directory_is_never_run(tiny, tmp_path):
    from llmflow.basemodels import ModelError
    from llmflow.config import TrainConfig
    from llmflow.finetune.checks import check_causal_lm
    from llmflow.finetune.loop import load_model

    model = tmp_path / "remote"
    shutil.copytree(tiny, model)
    marker = tmp_path / "remote-code-ran"
    (model / "modeling_evil.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    config = json.loads((model / "config.json").read_text())
    config["auto_map"] = {
        "AutoConfig": "modeling_evil.EvilConfig",
        "AutoModelForCausalLM": "modeling_evil.EvilModel",
    }
    config["model_type"] = "evil"
    (model / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="cannot read its config"):
        check_causal_lm(str(model))
    with pytest.raises(ValueError, match="trust_remote_code"):
        load_model(str(model), TrainConfig())
    assert not marker.exists()


def test_pickled_weights_are_never_unpickled(tiny, tmp_path):
    from llmflow.config import TrainConfig
    from llmflow.finetune.loop import load_model

    model = tmp_path / "pickled"
    shutil.copytree(tiny, model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pickle-ran"
    (model / "pytorch_model.bin").write_bytes(pickle.dumps(Evil(marker)))
    with pytest.raises(OSError, match="safetensors"):
        load_model(str(model), TrainConfig())
    assert not marker.exists()


def _from_pretrained_calls():
    for path in [
        *ROOT.glob("llmflow/**/*.py"),
        *ROOT.glob("tasks/*.py"),
        *ROOT.glob("deployments/*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "from_pretrained":
                yield path.relative_to(ROOT), node


def test_every_from_pretrained_refuses_remote_code_and_model_loads_want_safetensors():
    calls = list(_from_pretrained_calls())
    assert len(calls) >= 5
    for path, call in calls:
        kw = {k.arg: k.value for k in call.keywords}
        where = f"{path}:{call.lineno}"
        assert isinstance(kw.get("trust_remote_code"), ast.Constant), where
        assert kw["trust_remote_code"].value is False, where
        owner = ast.unparse(call.func.value)
        if "Model" in owner:  # AutoModelForCausalLM & co: weights, not configs or tokenizers
            assert isinstance(kw.get("use_safetensors"), ast.Constant), where
            assert kw["use_safetensors"].value is True, where


def test_api_key_comes_from_a_file_or_a_named_variable_and_errors_never_show_it(
    tmp_path, monkeypatch
):
    from llmflow.apikey import resolve_api_key

    assert resolve_api_key(None, None) is None
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    monkeypatch.setenv("LLMFLOW_TEST_KEY", "from-env")
    assert resolve_api_key("LLMFLOW_TEST_KEY", str(key_file)) == "from-file"  # the file wins
    assert resolve_api_key("LLMFLOW_TEST_KEY", None) == "from-env"
    key_file.write_text("  \n")
    with pytest.raises(ValueError, match=f"serve.api_key_file: {key_file} is empty"):
        resolve_api_key(None, str(key_file))
    with pytest.raises(ValueError, match="cannot read .*missing"):
        resolve_api_key(None, str(tmp_path / "missing"))
    monkeypatch.delenv("LLMFLOW_TEST_KEY")
    with pytest.raises(ValueError, match="environment variable LLMFLOW_TEST_KEY is not set"):
        resolve_api_key("LLMFLOW_TEST_KEY", None)


def test_both_serve_apps_judge_a_bearer_header_the_same_way():
    from llmflow.apikey import bearer_problem

    assert bearer_problem("Bearer k3y", "k3y") is None
    assert bearer_problem("Bearer  k3y ", "k3y") is None
    assert bearer_problem("", "k3y")[0] == "missing_api_key"
    assert bearer_problem("Basic k3y", "k3y")[0] == "missing_api_key"
    assert bearer_problem("Bearer k3", "k3y") == ("invalid_api_key", "Incorrect API key provided.")
