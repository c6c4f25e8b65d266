"""The chat page (llmflow/chat.py) as a Ray Serve application, next to the model it talks to.

    serve run deployments.chat_app:build_app endpoint=http://127.0.0.1:8000/v1 --route-prefix /chat

The promote stage deploys it with the model when the config says `serve.chat: true`
(application `<app_name>-chat` at `<route_prefix>/chat`), so a cluster serves both. The page
talks to the model through the Serve proxy over HTTP, the OpenAI-compatible API a browser
user's own client would use. One replica with no CPU reserved: it only relays text.
"""

from typing import Any

from ray import serve


@serve.deployment(name="chat", num_replicas=1, ray_actor_options={"num_cpus": 0})
@serve.ingress()
class ChatPage:
    """Gradio's app (built in the replica: gradio is imported there, not by the driver)
    mounted on a FastAPI app."""

    def __init__(
        self,
        endpoint: str,
        api_key_env: str | None = None,
        model: str | None = None,
        api_key_file: str | None = None,
    ):
        self.endpoint, self.api_key_env, self.model = endpoint, api_key_env, model
        self.api_key_file = api_key_file

    def __serve_build_asgi_app__(self):
        import gradio as gr
        from fastapi import FastAPI

        from llmflow.chat import build_chat, theme

        page = build_chat(
            self.endpoint, self.api_key_env, self.model, api_key_file=self.api_key_file
        )
        # Serve passes the route prefix as the ASGI root_path: Gradio builds its URLs from it.
        return gr.mount_gradio_app(
            FastAPI(),
            page.queue(default_concurrency_limit=8),
            path="",
            theme=theme(),
            footer_links=[],
            show_error=False,
        )


def build_app(args: dict[str, Any]) -> serve.Application:
    """Application builder for `serve run` / serve configs: ``endpoint`` (the model's OpenAI
    base URL, …/v1), optional ``api_key_env`` or ``api_key_file`` (names, never the key: it
    is read in the replica, as the model's app reads it) and ``model``."""
    return ChatPage.bind(**args)
