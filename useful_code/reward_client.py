"""Clients of the reward server (useful_code/serve_reward_model.py): a small Python client, a reward function with
TRL's `reward_funcs` signature for GRPOTrainer / RLOOTrainer, and a `compute_score` for verl.

    from useful_code.reward_client import RewardClient, trl_reward_function, verl_compute_score
    RewardClient("http://127.0.0.1:5000").score([[{"role": "user", "content": "Hi"},
                                                  {"role": "assistant", "content": "Hello!"}]])["rewards"]
    GRPOTrainer(..., reward_funcs=[trl_reward_function("http://127.0.0.1:5000")])
    compute_score = verl_compute_score("http://127.0.0.1:5000", prompt_key="question")   # in verl's reward file

Standard library only (http.client), so an RLHF job needs nothing more to call the server.
"""

from __future__ import annotations

import http.client
import json
import re
import threading
import urllib.parse
import warnings
from typing import Any, Callable, Optional

# A URL may name one of the server's endpoints (OpenRLHF's flag takes http://host:port/get_reward): the client
# strips it and calls every endpoint from the base.
ENDPOINTS = ("/get_reward", "/score", "/compare", "/health", "/info")

# Failures of a kept-alive connection that the server closed while it sat idle, before it answered anything: the
# request is sent again once, on a new connection. Never a timeout (TimeoutError is an OSError too): a slow request
# sent again would be scored twice and wait twice as long.
_STALE_CONNECTION = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError, http.client.RemoteDisconnected)

ROLES = ("system", "user", "assistant")
# Half of a UTF-16 surrogate pair, which JSON can escape ("\\ud800") but no tokenizer can read (the server's rule too).
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class RewardServerError(RuntimeError):
    """The server answered with an error (its one-line message and HTTP status; item, the index of the one
    conversation it refused, when the error is about one), or could not be reached."""

    def __init__(self, message: str, status: Optional[int] = None, item: Optional[int] = None):
        super().__init__(message if status is None else f"HTTP {status}: {message}")
        self.message, self.status, self.item = message, status, item


class RewardClient:
    """Calls one reward server over a kept-alive connection per thread (an RLHF loop calls it every step); every
    method returns the server's JSON answer as a dict. Safe to share between threads.

    url is the server's base URL, http(s)://host[:port][/prefix]; a trailing endpoint path (/get_reward, /score,
    /compare, /health, /info), as OpenRLHF's --reward.remote_url takes it, is stripped, so the same URL serves both."""

    def __init__(self, url: str = "http://127.0.0.1:5000", api_key: Optional[str] = None, timeout: float = 300.0):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"reward server URL must be http(s)://host[:port], got {url!r}")
        if parts.query or parts.fragment:
            raise ValueError(f"reward server URL must have no ?query or #fragment, got {url!r}")
        path = parts.path.rstrip("/")
        for endpoint in ENDPOINTS:
            if path.endswith(endpoint):
                path = path[:-len(endpoint)].rstrip("/")
                break
        self.url = urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self.api_key, self.timeout = api_key, timeout
        self._connection_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        self._address = (parts.hostname, parts.port)
        self._base_path = path
        self._local = threading.local()
        self._limits: Optional[dict] = None

    def _connection(self):
        if getattr(self._local, "connection", None) is None:
            self._local.connection = self._connection_class(*self._address, timeout=self.timeout)
        return self._local.connection

    def _drop_connection(self) -> None:
        connection, self._local.connection = getattr(self._local, "connection", None), None
        if connection is not None:
            connection.close()

    def _request(self, endpoint: str, payload: Optional[dict] = None) -> dict:
        body = None if payload is None else json.dumps(payload).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        method, path = "GET" if body is None else "POST", self._base_path + endpoint
        for attempt in (0, 1):
            connection = self._connection()
            reused = connection.sock is not None  # open from an earlier request (http.client reconnects when None)
            try:
                connection.request(method, path, body, headers)
                response = connection.getresponse()
            except _STALE_CONNECTION as err:
                self._drop_connection()
                if attempt == 0 and reused:
                    continue  # the server closed the idle connection before reading this request: send it again
                raise RewardServerError(f"cannot reach {self.url}{endpoint} ({err!r})") from None
            except (OSError, http.client.HTTPException) as err:  # a timeout among them: never sent again
                self._drop_connection()
                what = "no answer within the timeout" if isinstance(err, TimeoutError) else "cannot reach"
                raise RewardServerError(f"{what}: {self.url}{endpoint} ({err!r})") from None
            try:
                status, data = response.status, response.read()
            except (OSError, http.client.HTTPException) as err:
                self._drop_connection()
                raise RewardServerError(f"the answer of {self.url}{endpoint} broke off ({err!r})") from None
            break
        if status >= 400:
            try:
                answer = json.loads(data)
                message, item = answer.get("error", data.decode(errors="replace")), answer.get("item")
            except (ValueError, AttributeError):
                message, item = data.decode(errors="replace"), None
            raise RewardServerError(message, status, item if type(item) is int else None)
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

    def limits(self) -> dict:
        """The server's request limits (max_items, max_body_bytes, ...), read from /info once."""
        if self._limits is None:
            self._limits = self.info()["limits"]
        return self._limits

    def _score_requests(self, conversations: list, indices: list[int]) -> list[list[int]]:
        """indices split into /score requests within the server's --max_items and --max_body_bytes (the JSON body
        _request sends, counted exactly); a conversation too large for any request is left out."""
        limits = self.limits()
        max_items, room = int(limits["max_items"]), int(limits["max_body_bytes"]) - len(b'{"conversations": []}')
        requests, current, used = [], [], 0
        for i in indices:
            size = len(json.dumps(conversations[i]).encode())
            if size > room:
                continue
            extra = size + (2 if current else 0)  # the ", " between items
            if current and (len(current) == max_items or used + extra > room):
                requests.append(current)
                current, used, extra = [], 0, size
            current.append(i)
            used += extra
        return requests + ([current] if current else [])

    def rewards(self, conversations: list) -> list[Optional[float]]:
        """One reward per conversation, any number of them, in order; None for a conversation the server would
        refuse. Those are found here by the server's cheap rules (unscorable_reason: empty or blank content,
        content that is not a string such as a list of parts, a role other than system/user/assistant, roles out of
        turn, no final assistant message) and never sent; one the server still refuses by its index (a special token
        written as text, a chat template that refuses it, an ArmoRM input cut past its user turn) gets None too and
        the rest are sent again. The others go to /score in requests within the server's --max_items and
        --max_body_bytes (read from /info once; one conversation larger than that alone gets None). Any other error
        (auth, a PM server, an unreachable one) is raised. Each reason for a None is warned of once per process
        (Python's warnings), so an RLHF run's log says why some completions got no reward."""
        rewards: list[Optional[float]] = [None] * len(conversations)
        reasons = {i: unscorable_reason(conversation) for i, conversation in enumerate(conversations)}
        keep = [i for i, reason in reasons.items() if not reason]
        requests = self._score_requests(conversations, keep) if keep else []
        sent = {i for request in requests for i in request}
        reasons.update({i: "larger than the server's --max_body_bytes" for i in keep if i not in sent})
        for chunk in requests:
            while chunk:  # each refused item leaves the chunk: at most len(chunk) requests
                try:
                    scored = self.score([conversations[i] for i in chunk])["rewards"]
                except RewardServerError as err:
                    if err.status != 400 or err.item is None or not 0 <= err.item < len(chunk):
                        raise
                    # the server's line without its "HTTP 400: conversations[i]: " prefix: one warning per rule
                    reasons[chunk[err.item]] = "refused by the server: " + str(err).split(": ", 2)[-1]
                    del chunk[err.item]
                    continue
                for i, reward in zip(chunk, scored):
                    rewards[i] = reward
                break
        for reason in dict.fromkeys(r for r in reasons.values() if r):
            warnings.warn(f"reward server client: a conversation got no reward (None): {reason} (said once per "
                          "reason)", stacklevel=2)
        return rewards


def unscorable_reason(conversation: Any) -> str:
    """'' when the server's conversation rules (useful_code/formats.validate_conversation, which /score applies)
    hold for this conversation as far as they can be checked without its tokenizer, else the broken rule's key.
    The special-token rule needs the server's tokenizer: RewardClient.rewards learns of it from the server's 400."""
    if not isinstance(conversation, (list, tuple)) or not conversation:
        return "not_a_message_list"
    for message in conversation:
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) \
                or not isinstance(message.get("content"), str):
            return "not_a_message_list"  # a list of content parts (multimodal), a None content (a tool call)
        if LONE_SURROGATE.search(message["role"]) or LONE_SURROGATE.search(message["content"]):
            return "lone_surrogate"  # not Unicode text: the server answers 422 for the whole request
    if any(m["role"] not in ROLES for m in conversation):
        return "unknown_role"
    if any(not m["content"].strip() for m in conversation):
        return "empty_content"
    turns = conversation[1:] if conversation[0]["role"] == "system" else conversation
    if not turns or not all(m["role"] == ("user", "assistant")[i % 2] for i, m in enumerate(turns)):
        return "roles_not_alternating"
    if turns[-1]["role"] != "assistant":
        return "last_not_assistant"
    return ""


def _as_messages(value, role: str) -> list:
    """TRL passes plain strings (standard datasets) or message lists (conversational ones)."""
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    try:
        return list(value)
    except TypeError:
        return [value]  # not a message list: unscorable_reason says so


def trl_reward_function(url: str = "http://127.0.0.1:5000", api_key: Optional[str] = None,
                        timeout: float = 300.0, name: str = "reward_model") -> Callable[..., list[Optional[float]]]:
    """A TRL reward function, (prompts, completions, **kwargs) -> one reward per completion, that asks the server
    for the reward of each prompt + completion conversation (RewardClient.rewards: in requests of at most the
    server's --max_items).

    A completion the server would refuse gets None instead of a reward, and training goes on: an empty or blank
    reply, a `tool` message or any role but system/user/assistant, content given as a list of parts, roles out of
    turn, a special token as text (a warning names each reason once). TRL turns None into NaN and leaves that
    completion out of the rewards' means and advantages (it warns when every reward function gave None). Errors
    that are not about one completion (the server unreachable, a wrong api_key, a PM server) are raised. url may end
    with an endpoint such as /get_reward.
    name: the function's __name__, under which TRL logs its rewards (rewards/<name>/mean): give each of several
    servers its own, or TRL logs them under one name."""
    client = RewardClient(url, api_key, timeout)

    def reward_model(prompts, completions, **kwargs) -> list[Optional[float]]:
        conversations = [_as_messages(p, "user") + _as_messages(c, "assistant") for p, c in zip(prompts, completions)]
        return client.rewards(conversations)

    reward_model.__name__ = reward_model.__qualname__ = name
    return reward_model


def verl_compute_score(url: str = "http://127.0.0.1:5000", prompt_key: str = "question",
                       api_key: Optional[str] = None, timeout: float = 300.0,
                       unscorable_score: float = 0.0) -> Callable[..., Any]:
    """A verl `compute_score` that asks the server for the reward of each response. In the file named by verl's
    custom_reward_function.path (its .name defaults to compute_score):

        from useful_code.reward_client import verl_compute_score
        compute_score = verl_compute_score("http://127.0.0.1:5000", prompt_key="question")

    verl's default (naive) reward manager calls it once per sample, compute_score(data_source=, solution_str=,
    ground_truth=, extra_info=), and takes the float it returns. verl passes only the response (decoded with
    skip_special_tokens=True), never the prompt: the conversation is built from extra_info[prompt_key], a string
    (the user's message) or a list of {role, content} messages that the dataset must carry (verl's GSM8K
    preprocessing stores the question under "question"); a missing one is a KeyError naming the key. The batch
    reward manager (reward_manager.name=batch) calls it once per batch as compute_score(data_sources=,
    solution_strs=, ground_truths=, extra_infos=) and gets a list: one request per --max_items responses.

    A conversation the server would refuse (an empty response above all) gets unscorable_score, as verl needs a
    number: set it below your model's usual rewards to penalise empty answers. ground_truth and data_source are
    not used."""
    client = RewardClient(url, api_key, timeout)

    def conversation(solution_str, extra_info) -> list:
        if not isinstance(extra_info, dict) or prompt_key not in extra_info:
            raise KeyError(f"verl_compute_score: extra_info has no {prompt_key!r} (the prompt, which verl does not "
                           "pass): store it in each row's extra_info, or pass prompt_key=")
        return _as_messages(extra_info[prompt_key], "user") + _as_messages(solution_str, "assistant")

    def scores(conversations: list) -> list[float]:
        return [unscorable_score if r is None else r for r in client.rewards(conversations)]

    def compute_score(data_source=None, solution_str=None, ground_truth=None, extra_info=None, *,
                      data_sources=None, solution_strs=None, ground_truths=None, extra_infos=None, **kwargs):
        if solution_strs is not None:  # the batch reward manager
            infos = [None] * len(solution_strs) if extra_infos is None else list(extra_infos)
            return scores([conversation(s, e) for s, e in zip(solution_strs, infos)])
        return scores([conversation(solution_str, extra_info)])[0]

    return compute_score
