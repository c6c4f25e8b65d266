"""A chat page over the served model: Gradio in front of its OpenAI-compatible API.

    llmflow chat                      # http://127.0.0.1:7860, the local stack's served model
    llmflow up --chat                 # the same, as a background part of the stack

The page shows which model version answers, its lineage (dataset, flow run, eval metrics)
and the endpoint, streams each answer as it is generated, and turns every failure (endpoint
down, wrong or missing key, nothing served) into one readable line in the chat: never a
stack trace. Gradio is imported only by ``build_chat``: the message handling below is plain
Python, unit tested without it (and without a server).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from llmflow.chat_backend import ChatBackend

DEFAULT_PORT = 7860


PAGE_TITLE = "llmflow chat"


# -- the page ---------------------------------------------------------------------------------
def prefect_ui_url() -> str | None:
    """The Prefect UI the flow-run links point at (the stack's server), when known."""
    ui = os.environ.get("PREFECT_UI_URL")
    if ui:
        return ui
    api = os.environ.get("PREFECT_API_URL", "")
    return api.removesuffix("/").removesuffix("/api") or None


def theme():
    """Gradio's default theme on system fonts: the default one loads Google Fonts, which an
    offline machine cannot reach."""
    import gradio as gr

    system = ["ui-sans-serif", "system-ui", "sans-serif"]
    mono = ["ui-monospace", "SFMono-Regular", "monospace"]
    return gr.themes.Default(font=system, font_mono=mono)


def build_chat(
    endpoint: str,
    api_key_env: str | None = None,
    model: str | None = None,
    *,
    api_key_file: str | None = None,
    backend: ChatBackend | None = None,
):
    """The chat page as a Gradio Blocks: header (version, lineage, endpoint), the chat, and
    the sampling settings. Launch it, or mount it on a FastAPI app (deployments/chat_app.py).

    Args:
        endpoint: the OpenAI base URL of the served model (ending in /v1).
        api_key_env: the environment variable holding the endpoint's key, if it wants one.
        model: the model id to ask; None: the first one the endpoint lists.
        api_key_file: a file holding the key instead (wins over api_key_env).
        backend: a ChatBackend to use instead of one built from the other arguments.

    Returns:
        The gradio.Blocks.
    """
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    import gradio as gr

    backend = backend or ChatBackend(endpoint, api_key_env, model, api_key_file=api_key_file)
    ui = prefect_ui_url()

    def header() -> str:
        return backend.info(ui)

    with gr.Blocks(title=PAGE_TITLE, analytics_enabled=False, fill_height=True) as page:
        gr.Markdown(f"## {PAGE_TITLE}")
        info = gr.Markdown(
            f"Endpoint: `{backend.endpoint}` (asking it which model serves...)",
            elem_id="model-info",
        )
        with gr.Row():
            refresh = gr.Button("Refresh model info", size="sm", scale=0, elem_id="refresh-info")
        settings = [  # rendered by ChatInterface, in its "Sampling" accordion
            gr.Slider(
                0.0,
                2.0,
                value=0.7,
                step=0.05,
                label="Temperature",
                render=False,
                info="0: greedy (the same answer every time)",
            ),
            gr.Slider(1, 512, value=64, step=1, label="Max tokens", render=False),
            gr.Number(
                value=None,
                precision=0,
                label="Seed",
                render=False,
                placeholder="random",
                info="empty: a new sample each time; a number: the same answer again",
            ),
        ]
        gr.ChatInterface(
            backend.respond,
            additional_inputs=settings,
            additional_inputs_accordion=gr.Accordion("Sampling", open=True, render=False),
            chatbot=gr.Chatbot(elem_id="chatbot", scale=1, label="Chat"),
            textbox=gr.Textbox(
                placeholder="Ask the served model...",
                elem_id="prompt",
                submit_btn=True,
                show_label=False,
            ),
            flagging_mode="never",
            api_name="chat",
        )
        page.load(header, outputs=info)
        refresh.click(header, outputs=info)
    return page


def launch(
    endpoint: str,
    api_key_env: str | None = None,
    model: str | None = None,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    api_key_file: str | None = None,
    echo: Callable[[str], None] = print,
) -> None:
    """Serve the page on host:port in the foreground until interrupted."""
    page = build_chat(endpoint, api_key_env, model, api_key_file=api_key_file)
    page.queue(default_concurrency_limit=8).launch(
        server_name=host,
        server_port=port,
        share=False,
        inbrowser=False,
        quiet=True,
        show_error=False,
        theme=theme(),
        footer_links=[],
        prevent_thread_lock=True,
    )
    echo(f"Chat: http://{host}:{port}  (model endpoint {endpoint}; Ctrl-C stops it)")
    page.block_thread()  # until Ctrl-C or SIGTERM
