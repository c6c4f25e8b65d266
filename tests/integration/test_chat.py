"""The chat page against the real served model: the message handler streams the answer,
failures read as one clear line, the page runs as a part of the stack, and a headless
Chromium (Debian's package, driven by Playwright) chats through it.

One Serve app (the tiny model behind a key) and one browser session, to stay cheap on 2 cores.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import itertools
import os
import re
import shutil

import pytest

from llmflow.chat_backend import NOTICE, ChatBackend, is_notice
from tests.conftest import free_port

pytestmark = pytest.mark.slow
WRONG_ENV = "LLMFLOW_TEST_CHAT_WRONG_KEY"
PROMPT = "Reverse this number: 123"
# The untrained tiny model's greedy answer is special tokens only (empty once decoded): sample,
# seeded, so the answer is the same text every run.
SAMPLING = {"temperature": 1.0, "max_tokens": 12, "seed": 3}


@pytest.fixture(scope="module")
def served(stack, tmp_path_factory):
    """(endpoint, key file, chat part's status): the tiny model served behind a key at
    /chattest, and the chat page started as `llmflow up --chat` starts it, on a port of its
    own. The key reaches both in a file (a mounted secret), as serve.api_key_file says."""
    import ray
    from ray import serve

    from deployments.openai_app import build_app
    from llmflow import launch
    from llmflow import stack as stack_mod
    from llmflow.basemodels import resolve_base_model
    from llmflow.cluster import ray_init_kwargs
    from llmflow.config import ClusterConfig, TrainConfig

    key_file = tmp_path_factory.mktemp("secret") / "chat-key"
    key_file.write_text("chat-key\n")
    key_file.chmod(0o600)
    os.environ[WRONG_ENV] = "not-the-key"
    endpoint = f"{stack.serve_url}/chattest/v1"
    s = dataclasses.replace(stack, chat_port=free_port())
    try:
        with cf.ThreadPoolExecutor(1) as pool:  # the page starts while the model loads
            page = pool.submit(
                stack_mod.start_chat, s, endpoint, ["--set", f"serve.api_key_file={key_file}"]
            )
            if not ray.is_initialized():
                ray.init(stack.ray_address, **ray_init_kwargs(ClusterConfig()))
            serve.run(
                build_app(
                    {
                        "model_path": resolve_base_model(TrainConfig()),
                        "model_name": "tiny",
                        "version": "7",
                        "api_key_file": str(key_file),
                        "lineage": {
                            "dataset_sha256": "d5a1" * 16,
                            "flow_run_id": "run-42",
                            "eval_metrics": {"exact_match": 0.5},
                        },
                    }
                ),
                name="test-chat",
                route_prefix="/chattest",
            )
            part = page.result()
        yield endpoint, str(key_file), part
    finally:
        launch.stop_chat(s)  # the session stack's status lists exactly its own parts again
        serve.delete("test-chat")


def test_answer_streams_from_the_served_model(served):
    endpoint, key_file, _ = served
    backend = ChatBackend(endpoint, api_key_file=key_file)
    shown = list(backend.respond(PROMPT, [], **SAMPLING))
    # Streamed: the answer grows piece by piece (the tiny model's pieces hold no spaces, so
    # the server's streamer sends them as one piece here).
    assert all(b.startswith(a) for a, b in itertools.pairwise(shown)), shown
    assert shown[-1].strip() and not is_notice(shown[-1]), shown
    history = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": shown[-1]}]
    again = list(backend.respond("Reverse this number: 45", history, **SAMPLING))
    assert again and not is_notice(again[-1]), again
    info = backend.info()
    assert "**Serving `tiny` version `7`**" in info and "dataset `d5a1d5a1d5a1…`" in info
    assert "flow run `run-42`" in info and "eval: exact_match 0.5" in info and endpoint in info


def test_endpoint_down_is_one_clear_line(served):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    shown = list(ChatBackend(dead).respond(PROMPT, [], **SAMPLING))
    assert shown == [
        (
            f"{NOTICE}The model endpoint {dead} is not reachable. Start the stack with "
            "`llmflow up` and serve a model (`llmflow run pipeline`, or "
            "`llmflow models promote NAME VERSION`)."
        )
    ]
    assert (
        ChatBackend(dead).info().startswith(f"{NOTICE}The model endpoint {dead} is not reachable")
    )


def test_wrong_or_missing_key_is_one_clear_line(served):
    endpoint, _, _ = served
    wrong = list(ChatBackend(endpoint, WRONG_ENV, model="tiny").respond(PROMPT, [], **SAMPLING))
    assert wrong == [
        (
            f"{NOTICE}The endpoint {endpoint} refused the API key in the environment "
            f"variable {WRONG_ENV}: Incorrect API key provided."
        )
    ]
    assert ChatBackend(endpoint, WRONG_ENV).info().startswith(wrong[0])  # the header says so too
    missing = list(ChatBackend(endpoint, "LLMFLOW_TEST_UNSET_KEY").respond(PROMPT, [], **SAMPLING))
    assert (
        len(missing) == 1
        and "needs an API key: set the environment variable LLMFLOW_TEST_UNSET_KEY" in missing[0]
    )


def test_chat_part_is_in_the_stack_status(served):
    _, _, part = served
    assert part.name == "chat" and part.healthy and part.pid, part
    assert part.url.startswith("http://127.0.0.1:") and "/chattest/v1" in part.detail


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        if shutil.which(name):
            return shutil.which(name)
    return None


def test_browser_chat(served):
    """Headless Chromium opens the page, sees the version, sends a prompt and gets the
    streamed answer."""
    chromium = _chromium()
    if chromium is None:
        pytest.skip(
            "no chromium on PATH: `apt-get install chromium` (make install tries it "
            "when it runs as root)"
        )
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    _, _, part = served
    expect = sync_api.expect
    with sync_api.sync_playwright() as pw:
        # --no-sandbox: Chromium's sandbox refuses to run as root (CI containers).
        browser = pw.chromium.launch(
            executable_path=chromium,
            headless=True,
            args=["--no-sandbox", "--disable-dev-shm-usage"],
        )
        try:
            page = browser.new_page()
            page.goto(part.url, wait_until="domcontentloaded", timeout=60_000)
            expect(page.locator("#model-info")).to_contain_text(
                "Serving tiny version 7", timeout=60_000
            )
            for label, value in (
                ("number input for Temperature", SAMPLING["temperature"]),
                ("number input for Max tokens", SAMPLING["max_tokens"]),
                ("Seed", SAMPLING["seed"]),
            ):
                page.get_by_label(label, exact=True).fill(str(value))
                page.get_by_label(label, exact=True).press("Tab")
            prompt = page.locator("#prompt textarea")
            prompt.fill(PROMPT)
            prompt.press("Enter")
            answer = page.locator("#chatbot .bot-row").last
            expect(answer).to_have_text(re.compile(r"\S"), timeout=60_000)
            expect(prompt).to_be_editable(timeout=60_000)  # the stream has ended
            text = answer.inner_text().strip()
            assert text and not text.startswith("\u26a0"), text  # not one of the chat's notices
        finally:
            browser.close()
