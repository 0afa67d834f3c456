"""Clients of the reward server (useful_code/serve_reward_model.py): a small Python client, and a reward function
with TRL's `reward_funcs` signature for GRPOTrainer / RLOOTrainer.

    from useful_code.reward_client import RewardClient, trl_reward_function
    RewardClient("http://127.0.0.1:5000").score([[{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello!"}]])["rewards"]
    GRPOTrainer(..., reward_funcs=[trl_reward_function("http://127.0.0.1:5000")])

Standard library only (http.client), so an RLHF job needs nothing more to call the server.
"""

from __future__ import annotations

import http.client
import json
import threading
import urllib.parse
from typing import Callable, Optional


class RewardServerError(RuntimeError):
    """The server answered with an error (its one-line message and HTTP status), or could not be reached."""

    def __init__(self, message: str, status: Optional[int] = None):
        super().__init__(message if status is None else f"HTTP {status}: {message}")
        self.status = status


class RewardClient:
    """Calls one reward server over a kept-alive connection per thread (an RLHF loop calls it every step); every
    method returns the server's JSON answer as a dict. Safe to share between threads."""

    def __init__(self, url: str = "http://127.0.0.1:5000", api_key: Optional[str] = None, timeout: float = 300.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"reward server URL must be http(s)://host[:port], got {url!r}")
        self.url, self.api_key, self.timeout = url.rstrip("/"), api_key, timeout
        self._connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._address = (parts.hostname, parts.port)
        self._base_path = parts.path.rstrip("/")
        self._local = threading.local()

    def _connection(self, fresh: bool = False):
        if fresh or getattr(self._local, "connection", None) is None:
            self._local.connection = self._connection_class(*self._address, timeout=self.timeout)
        return self._local.connection

    def _request(self, endpoint: str, payload: Optional[dict] = None) -> dict:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in (0, 1):  # a kept-alive connection the server closed meanwhile is opened again, once
            connection = self._connection(fresh=attempt == 1)
            try:
                connection.request("GET" if body is None else "POST", self._base_path + endpoint, body, headers)
                response = connection.getresponse()
                status, data = response.status, response.read()
                break
            except (ConnectionError, http.client.HTTPException, OSError) as err:
                connection.close()
                if attempt == 1:
                    raise RewardServerError(f"cannot reach {self.url} ({err})") from None
        if status >= 400:
            try:
                message = json.loads(data).get("error", data.decode(errors="replace"))
            except ValueError:
                message = data.decode(errors="replace")
            raise RewardServerError(message, status)
        return json.loads(data)

    def health(self) -> dict:
        """{"status": "ok"} when the server is up."""
        return self._request("/health")

    def info(self) -> dict:
        """The model's kind, dtype, max_length, the server's version and limits."""
        return self._request("/info")

    def get_reward(self, queries: list[str], prompts: Optional[list] = None, labels: Optional[list] = None) -> dict:
        """OpenRLHF's call: rewards of chat-templated texts (prompt and response)."""
        payload = {"query": queries}
        if prompts is not None:
            payload["prompts"] = prompts
        if labels is not None:
            payload["labels"] = labels
        return self._request("/get_reward", payload)

    def score(self, conversations: list[list[dict]]) -> dict:
        """Rewards of conversations ({role, content} messages), templated by the server's tokenizer."""
        return self._request("/score", {"conversations": conversations})

    def compare(self, context: list[dict], responses: list[str]) -> dict:
        """A preference model's pairwise probabilities over responses to one context, and the winner."""
        return self._request("/compare", {"context": context, "responses": responses})


def _as_messages(value, role: str) -> list[dict]:
    """TRL passes plain strings (standard datasets) or message lists (conversational ones)."""
    return [{"role": role, "content": value}] if isinstance(value, str) else list(value)


def trl_reward_function(url: str = "http://127.0.0.1:5000", api_key: Optional[str] = None,
                        timeout: float = 300.0) -> Callable[..., list[float]]:
    """A TRL reward function, (prompts, completions, **kwargs) -> one float per completion, that asks the server
    for the reward of each prompt + completion conversation (all in one request)."""
    client = RewardClient(url, api_key, timeout)

    def reward_model(prompts, completions, **kwargs) -> list[float]:
        conversations = [_as_messages(p, "user") + _as_messages(c, "assistant") for p, c in zip(prompts, completions)]
        return client.score(conversations)["rewards"]

    return reward_model
