"""Serve a reward model over HTTP for an RLHF loop (OpenRLHF's --reward.remote_url, verl, a TRL reward function).

    python useful_code/serve_reward_model.py --reward_name_or_path DIR [--port 5000]    # or: make serve

The checkpoint's kind is read from its config: a BT reward model, an exported ArmoRM model (with
--trust_remote_code) or a pairwise preference model. Endpoints:
  POST /get_reward  {"query": [text, ...], "prompts": [...], "labels": [...]} -> {"rewards", "scores", "extra_logs"}
                    (OpenRLHF's shape; each query a chat-templated prompt and response)
  POST /score       {"conversations": [[{"role", "content"}, ...], ...]} -> {"rewards", "extra_logs"} (ArmoRM: also
                    "attribute_rewards" and "gating_weights"), templated here with the checkpoint's tokenizer
  POST /compare     {"context": [messages], "responses": [a, b, ...]} -> pairwise probabilities and the winner (PM)
  GET  /health, GET /info
Concurrent requests are gathered for --batch_wait_ms up to --max_batch_tokens and scored as one length-sorted batch;
a gathered batch that fails is scored again request by request, so only the request at fault fails. Parsing,
checking and tokenising run on a thread pool, never on the event loop.
It listens on 127.0.0.1 unless --host says otherwise; any other address needs --api_key (a bearer token).
"""

import asyncio
import errno
import hmac
import importlib.metadata
import ipaddress
import json
import logging
import math
import re
import signal
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Annotated, Any, Optional

import uvicorn
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictStr, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from transformers import PretrainedConfig

from useful_code.cli import ModelOutputError, UserError, parse_args, run_cli
from useful_code.defaults import REPO_ROOT
from useful_code.hardware import peak_gpu_memory_mib
from useful_code.reward_client import LONE_SURROGATE
from useful_code.reward_scorer import KINDS, RewardScorer, checkpoint_kind
from useful_code.scoring import split_by_sizes, token_budget_field

DEMO_CHECKPOINT = REPO_ROOT / "outputs" / "demo" / "last_checkpoint"


@dataclass
class ServerArguments:
    """Where the model is, where to listen, and the bounds every request is held to."""

    reward_name_or_path: Optional[str] = field(default=None, metadata={
        "help": "BT, ArmoRM or PM checkpoint (hub name or directory). Default: make demo's checkpoint."})
    host: str = field(default="127.0.0.1", metadata={"help": "Address to bind; other than loopback needs --api_key."})
    port: int = field(default=5000, metadata={"min": 1, "max": 65535})
    api_key: Optional[str] = field(default=None, metadata={
        "help": "Bearer token every request but /health must carry (Authorization: Bearer KEY)."})
    max_length: int = field(default=4096, metadata={"min": 1, "help": "Longer inputs are cut from the left (counted)."})
    batch_size: int = field(default=16, metadata={"min": 1, "help": "Sequences per padded forward pass."})
    max_tokens_per_batch: int = token_budget_field()
    max_batch_tokens: int = field(default=65536, metadata={
        "min": 1, "help": "Token budget of one gathered batch of concurrent requests."})
    batch_wait_ms: float = field(default=5.0, metadata={
        "min": 0, "help": "How long the first request of a batch waits for others to join it."})
    max_items: int = field(default=512, metadata={"min": 1, "help": "Queries, conversations or responses per request."})
    max_messages: int = field(default=1024, metadata={
        "min": 1, "help": "Messages per conversation (and per /compare context)."})
    max_responses: int = field(default=32, metadata={
        "min": 2, "help": "Responses per /compare request: it scores every pair in both orders, n(n-1) sequences."})
    max_body_bytes: int = field(default=16_000_000, metadata={"min": 1, "help": "Largest request body accepted."})
    body_timeout_s: float = field(default=30.0, metadata={
        "min": 0.001, "help": "A request body not fully received this long after its headers is answered 408."})
    shutdown_timeout_s: int = field(default=5, metadata={
        "min": 0, "help": "On SIGTERM or Ctrl-C, how long requests in flight may finish before their connections "
                          "are closed (a second Ctrl-C closes them at once)."})
    bf16: bool = field(default=True, metadata={"help": "bf16 where the GPU supports it (fp32 on CPU)."})
    attn_implementation: str = field(default="auto")
    trust_remote_code: bool = field(default=False, metadata={"help": "Run a checkpoint's own code (ArmoRM)."})
    load_pickled_weights: bool = field(default=False)
    normalize_reward: bool = field(default=False, metadata={
        "help": "Return (reward - mean) / std, by the mean and std of the held-out rewards in a BT checkpoint's "
                "config (bradley-terry-rm/train.py writes them; OpenRLHF's serve_rm --reward.normalize_enable)."})


def reward_scale(kind: str, config: dict, model_name: str) -> tuple[float, float]:
    """(mean, std) that --normalize_reward divides by: config.mean and config.std of a BT checkpoint (kind, and its
    config as a dict), OpenRLHF's names, which bradley-terry-rm/train.py and OpenRLHF's reward trainer write."""
    if kind != "bt":
        raise UserError(f"--normalize_reward: {model_name} is a {KINDS[kind]}; only a Bradley-Terry "
                        "checkpoint carries the reward scale to normalize by")
    mean, std = config.get("mean"), config.get("std")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in (mean, std)) \
            or std <= 0:
        raise UserError(f"--normalize_reward: {model_name}'s config.json has no usable mean and std (a finite mean, "
                        f"a std above 0; got {mean!r}, {std!r}): bradley-terry-rm/train.py writes them into "
                        "last_checkpoint/ (a periodic checkpoint-N has none)")
    return float(mean), float(std)


def is_loopback(host: str) -> bool:
    """Whether host names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class DynamicBatcher:
    """Gathers the sequences of concurrent requests for up to wait_s (or until max_tokens) and scores them in one
    call, on one worker thread (the model is never run by two threads at once); each request gets its own slice
    of the results back."""

    def __init__(self, score, wait_s: float, max_tokens: int):
        self.score, self.wait_s, self.max_tokens = score, wait_s, max_tokens
        self.queue: asyncio.Queue = asyncio.Queue()
        # Requests being prepared (expecting() counts them: body read, parsed and authorised) less those already
        # submitted: the ones worth waiting for. A client still uploading its body is not one of them.
        self.in_flight = self.submitted = 0
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="scoring")
        self.batches = 0  # gathered batches run so far (the /info page shows it)

    @contextmanager
    def expecting(self):
        """Counts a request that will submit sequences while it prepares them (on the event loop only)."""
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def submit(self, sequences: list[list[int]]) -> dict:
        """The score() results of these sequences, computed in a batch with other requests' sequences."""
        future = asyncio.get_running_loop().create_future()
        self.submitted += 1
        try:
            await self.queue.put((sequences, future))
            return await future
        finally:
            self.submitted -= 1

    async def run_in_worker(self, function, *args):
        """function(*args) on the scoring thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    async def serve_forever(self) -> None:
        """Gather queued requests into batches and score each on the worker thread, for as long as the app runs."""
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            tokens = sum(map(len, items[0][0]))
            deadline = loop.time() + self.wait_s
            while tokens < self.max_tokens and (left := deadline - loop.time()) > 0:
                if self.queue.empty() and self.in_flight <= self.submitted:
                    break  # nobody else is on the way; later arrivals queue up while this batch runs
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
                tokens += sum(map(len, items[-1][0]))
            sequences = [s for item_sequences, _ in items for s in item_sequences]
            try:
                results = await self.run_in_worker(self.score, sequences)
            except Exception as err:  # never the server's end; and only the request at fault fails
                if len(items) == 1:
                    if not items[0][1].done():
                        items[0][1].set_exception(err)
                    continue
                await self.score_one_by_one(items)
                continue
            self.batches += 1
            sizes = [len(item_sequences) for item_sequences, _ in items]
            per_key = {key: split_by_sizes(values, sizes) for key, values in results.items()}
            for n, (_, future) in enumerate(items):
                if not future.done():  # a client that went away leaves a cancelled future
                    future.set_result({key: groups[n] for key, groups in per_key.items()})

    async def score_one_by_one(self, items: list) -> None:
        """After a gathered batch failed: each request's sequences scored on their own, so its result or its error
        is its own (one request's bad input never fails the others batched with it)."""
        for item_sequences, future in items:
            if future.done():
                continue
            try:
                result = await self.run_in_worker(self.score, item_sequences)
            except Exception as err:
                if not future.done():
                    future.set_exception(err)
                continue
            self.batches += 1
            if not future.done():
                future.set_result(result)


def _unicode_text(text: str) -> str:
    """A JSON string may escape half of a UTF-16 surrogate pair ("\\ud800"): no tokenizer can read that."""
    found = LONE_SURROGATE.search(text)
    if found:
        raise ValueError(f"holds a lone surrogate (U+{ord(found.group()):04X} at character {found.start()}), "
                         "which is not Unicode text")
    return text


Text = Annotated[StrictStr, AfterValidator(_unicode_text)]


class Message(BaseModel):
    """One chat message; keys besides role and content are ignored, as chat templates ignore them."""
    model_config = ConfigDict(extra="ignore")
    role: Text
    content: Text


class GetRewardRequest(BaseModel):
    """OpenRLHF's remote reward request: chat-templated prompt + response texts; prompts and labels, one per query
    when given, are not used for the reward."""
    query: list[Text] = Field(min_length=1)
    prompts: Optional[list[Any]] = None
    labels: Optional[list[Any]] = None


class ScoreRequest(BaseModel):
    """Conversations ending with the assistant's response, templated on the server."""
    conversations: list[list[Message]] = Field(min_length=1)


class CompareRequest(BaseModel):
    """A PM comparison: one context and the responses to compare, pairwise in both orders."""
    context: list[Message] = Field(min_length=1)
    responses: list[Text] = Field(min_length=2)


def bearer_token_matches(headers: list[tuple[bytes, bytes]], api_key: str) -> bool:
    """Whether the request carries exactly one Authorization header, "Bearer KEY" (the scheme in any case, RFC 7235),
    with KEY the server's (compared in constant time)."""
    given = [value for name, value in headers if name.lower() == b"authorization"]
    if len(given) != 1:
        return False
    scheme, _, token = given[0].strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), api_key.encode())


class RequestGate:
    """Before a request body is read: refuses a request without the bearer token (when --api_key is set; all but
    /health), and a POST body over max_bytes or of unstated length. A plain ASGI middleware: Starlette's
    @app.middleware wrapper costs about a millisecond per request, a third of a tiny model's forward."""

    def __init__(self, app, max_bytes: int, api_key: Optional[str]):
        self.app, self.max_bytes, self.api_key = app, max_bytes, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.api_key is not None and scope["path"] != "/health" \
                and not bearer_token_matches(scope["headers"], self.api_key):
            message = "missing or wrong bearer token (Authorization: Bearer KEY)"
            return await _error(401, message, close=True)(scope, receive, send)
        if scope["method"] != "POST":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length", b"")
        if not length.isdigit():
            # Its body is not read: the connection is closed after the answer, never parsed as a next request.
            return await _error(411, "a request body needs a Content-Length header", close=True)(scope, receive, send)
        if int(length) > self.max_bytes:
            message = f"request body of {int(length)} bytes is over --max_body_bytes={self.max_bytes}"
            return await _error(413, message, close=True)(scope, receive, send)
        return await self.app(scope, receive, send)


def one_line(errors: list[dict]) -> str:
    """The first of pydantic's validation errors as "where: what" (where as conversations.0.1.content)."""
    first = errors[0]
    if first.get("type") == "model_type" and not first.get("loc"):
        return "body: must be a JSON object"
    where = ".".join(str(part) for part in first.get("loc", ()) if part != "body")
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return f"{where or 'body'}: {message}"


def parse_body(body: bytes, model: type[BaseModel], content_encoding: Optional[str]) -> BaseModel:
    """The request model from a JSON body; anything else is a 422 with one line saying what is wrong."""
    if not body.strip():
        raise HTTPException(422, "the body is not valid JSON (it is empty)")
    try:
        data = json.loads(body)
    except RecursionError:
        reason = "nested too deeply"
    except UnicodeDecodeError:
        reason = "not UTF-8 text" + (f"; Content-Encoding {content_encoding} is not supported"
                                     if content_encoding else "")
    except json.JSONDecodeError as err:
        reason = err.msg
    except ValueError as err:  # an integer of over 4300 digits
        reason = "a number has too many digits" if "digits" in str(err) else str(err).splitlines()[0][:200]
    else:
        try:
            return model.model_validate(data)
        except ValidationError as err:
            raise HTTPException(422, one_line(err.errors())) from None
    raise HTTPException(422, f"the body is not valid JSON ({reason})")


def build_app(scorer: RewardScorer, args: ServerArguments, model_name: str) -> FastAPI:
    """The FastAPI application: endpoints, authentication and request bounds around one loaded scorer."""
    check_access(args.host, args.api_key)
    scale = reward_scale(scorer.kind, scorer.model.config.to_dict(), model_name) if args.normalize_reward else None
    batcher = DynamicBatcher(scorer.score, args.batch_wait_ms / 1000, args.max_batch_tokens)
    # JSON parsing, the conversation checks and tokenising: off the event loop, which keeps answering (/health) while
    # a large request is prepared. Only the model runs on the batcher's one scoring thread.
    preparing = ThreadPoolExecutor(max_workers=4, thread_name_prefix="preparing")

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        task = asyncio.create_task(batcher.serve_forever())
        yield
        task.cancel()
        batcher.worker.shutdown(wait=False, cancel_futures=True)
        preparing.shutdown(wait=False, cancel_futures=True)

    # No /docs, /redoc or /openapi.json: the endpoints are documented in the README, and these pages would need the
    # bearer token as much as the rest.
    app = FastAPI(title="reward model server", version=_version(), lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    app.add_middleware(RequestGate, max_bytes=args.max_body_bytes, api_key=args.api_key)

    @app.exception_handler(StarletteHTTPException)  # FastAPI's own (404, 405) and ours: one shape for all errors
    async def http_error(request: Request, err: StarletteHTTPException):
        response = _error(err.status_code, str(err.detail))
        response.headers.update(err.headers or {})
        return response

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError):
        if isinstance(err, ModelOutputError):
            return _error(500, str(err))
        item = ITEM_ERROR.match(str(err))
        return _error(400, str(err), item=int(item.group(1)) if item else None)

    @app.exception_handler(Exception)  # anything unforeseen: one JSON line (no details: they may hold others' data)
    async def unexpected_error(request: Request, err: Exception):
        return _error(500, f"internal server error ({type(err).__name__}) on {request.url.path}; the server's log "
                           "has the details")

    async def off_loop(function, *function_args):
        return await asyncio.get_running_loop().run_in_executor(preparing, function, *function_args)

    async def read_request(request: Request, model: type[BaseModel]) -> BaseModel:
        """The request model from a JSON body that arrives within --body_timeout_s (parsed on the thread pool)."""
        media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media_type != "application/json":
            raise HTTPException(415, "send Content-Type: application/json (the body is a JSON object)")
        try:
            body = await asyncio.wait_for(request.body(), args.body_timeout_s)
        except asyncio.TimeoutError:
            raise HTTPException(408, f"the request body did not arrive within --body_timeout_s={args.body_timeout_s}",
                                headers={"Connection": "close"}) from None
        except ClientDisconnect:
            raise HTTPException(400, "the client went away before its body arrived") from None
        return await off_loop(parse_body, body, model, request.headers.get("content-encoding"))

    def check_count(name: str, items: list, limit: int, flag: str, unit: str = "items") -> None:
        if len(items) > limit:
            raise HTTPException(413, f"{name}: {len(items)} {unit}, over {flag}={limit}")

    def check_messages(conversation: list[dict], where: str, ends_with_assistant: bool = True) -> None:
        check_count(where, conversation, args.max_messages, "--max_messages", "messages")
        scorer.check_conversation(conversation, where, ends_with_assistant)

    def needs_rewards(endpoint: str) -> None:
        if scorer.kind == "pm":
            raise UserError(f"{endpoint}: this server holds a {KINDS['pm']}, which compares responses: use /compare")

    async def rewards_of(sequences: list[list[int]]) -> dict:
        results = await batcher.submit(sequences)
        for key, values in results.items():  # rewards; ArmoRM's attribute_rewards and gating_weights too
            bad = [i for i, v in enumerate(values) if not all(map(math.isfinite, v if isinstance(v, list) else [v]))]
            if bad:
                raise ModelOutputError(f"the model gave NaN or infinite {key} for items {bad[:10]}")
        if scale:
            mean, std = scale
            results = {**results, "rewards": [(reward - mean) / std for reward in results["rewards"]]}
        return results

    def prepare_texts(body: GetRewardRequest) -> tuple[list[list[int]], int]:
        check_count("query", body.query, args.max_items, "--max_items")
        for name, values in (("prompts", body.prompts), ("labels", body.labels)):
            if values is not None and len(values) != len(body.query):
                raise UserError(f"{name}: {len(values)} items for {len(body.query)} queries")
        return scorer.encode_texts(body.query)

    def prepare_conversations(body: ScoreRequest) -> tuple[list[list[int]], int]:
        check_count("conversations", body.conversations, args.max_items, "--max_items")
        conversations = [[m.model_dump() for m in conversation] for conversation in body.conversations]
        for i, conversation in enumerate(conversations):
            if not conversation:
                raise UserError(f"conversations[{i}]: a conversation needs at least one message")
            check_messages(conversation, f"conversations[{i}]")
        return scorer.encode_conversations(conversations, "conversations[{}]")

    def prepare_comparison(body: CompareRequest) -> list[dict]:
        check_count("responses", body.responses, min(args.max_responses, args.max_items),
                    "--max_responses" if args.max_responses <= args.max_items else "--max_items")
        context = [m.model_dump() for m in body.context]
        check_messages(context, "context", ends_with_assistant=False)
        for i, response in enumerate(body.responses):
            scorer.check_conversation(context + [{"role": "assistant", "content": response}], f"responses[{i}]")
        return context

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info")
    async def info():
        return {"kind": scorer.kind, "kind_name": KINDS[scorer.kind], "model": model_name,
                "dtype": str(scorer.dtype).replace("torch.", ""), "max_length": scorer.max_length,
                "model_position_limit": scorer.position_limit, "version": _version(),
                "attributes": scorer.attributes, "batches_run": batcher.batches,
                "reward_normalization": dict(zip(("mean", "std"), scale)) if scale else None,
                "peak_gpu_memory_mib": peak_gpu_memory_mib(),  # the allocator's peak so far; None without a GPU
                "limits": {"max_items": args.max_items, "max_messages": args.max_messages,
                           "max_responses": args.max_responses, "max_body_bytes": args.max_body_bytes,
                           "body_timeout_s": args.body_timeout_s, "max_batch_tokens": args.max_batch_tokens,
                           "batch_wait_ms": args.batch_wait_ms}}

    async def scored(request: Request, endpoint: str, model: type[BaseModel], prepare) -> tuple[dict, dict]:
        """A /get_reward or /score request read, checked and tokenized off the event loop, then scored with other
        requests' sequences: (its results, its extra_logs)."""
        needs_rewards(endpoint)
        body = await read_request(request, model)
        with batcher.expecting():
            sequences, cut = await off_loop(prepare, body)
            return await rewards_of(sequences), extra_logs(cut, sequences)

    @app.post("/get_reward")
    async def get_reward(request: Request):
        results, logs = await scored(request, "/get_reward", GetRewardRequest, prepare_texts)
        return {"rewards": results["rewards"], "scores": results["rewards"], "extra_logs": logs}

    @app.post("/score")
    async def score(request: Request):
        results, logs = await scored(request, "/score", ScoreRequest, prepare_conversations)
        return {**results, "extra_logs": logs}

    @app.post("/compare")
    async def compare(request: Request):
        if scorer.kind != "pm":
            raise UserError(f"/compare needs a {KINDS['pm']}; this server holds a {KINDS[scorer.kind]}: use /score")
        body = await read_request(request, CompareRequest)
        context = await off_loop(prepare_comparison, body)
        # The cut count is taken inside the same call on the scoring thread: this request's sequences only.
        results, cut = await batcher.run_in_worker(scorer.compare, [context], [body.responses])
        return {**results[0], "extra_logs": extra_logs(cut)}

    return app


def extra_logs(cut: int, sequences: Optional[list[list[int]]] = None) -> dict:
    """The answer's "extra_logs": sequences cut to --max_length and (where known) tokens scored. The keys carry an
    "rm_" prefix because OpenRLHF copies every extra_logs key into the sample's info dict, where "truncated" is
    already its own flag of a generation cut at the length limit (rollout/truncated_rate): a bare "truncated"
    would overwrite it."""
    logs = {"rm_truncated": cut}
    if sequences is not None:
        logs["rm_tokens"] = sum(map(len, sequences))
    return logs


# An error about one conversation of a /score request starts with its name, conversations[i] (the `where` of
# prepare_conversations); the answer then carries i as "item", so that a client can set that conversation aside and
# send the others again (reward_client.RewardClient.rewards).
ITEM_ERROR = re.compile(r"conversations\[(\d+)\]")


def _error(status: int, message: str, close: bool = False, item: Optional[int] = None) -> JSONResponse:
    return JSONResponse({"error": message, "detail": message, **({"item": item} if item is not None else {})},
                        status_code=status, headers={"Connection": "close"} if close else None)


def _version() -> str:
    try:
        return importlib.metadata.version("rlhf-reward-modeling")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def bind_socket(host: str, port: int) -> socket.socket:
    """host:port bound before the model loads (uvicorn listens on it once the app is ready): one line when it cannot
    be (in use, or not this machine's), and no other process can take the port while the model loads."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    # As uvicorn binds: a port whose last connections are in TIME_WAIT is free, one with a listener is not.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        # In use, or below 1024 without root: the port is the problem; anything else is the address.
        port_problem = err.errno in (errno.EADDRINUSE, errno.EACCES)
        advice = "pick another --port" if port_problem else "--host must name this machine"
        raise UserError(f"--host {host} --port {port}: cannot listen there ({err.strerror or err}); {advice}") \
            from None
    return sock


class CancelledAtShutdown(logging.Filter):
    """Drops the tracebacks of a stop: uvicorn's "Exception in ASGI application" for a request cancelled because
    --shutdown_timeout_s ran out (uvicorn has said so in one line, "Cancel N running task(s)"), and Starlette's
    lifespan failure text when a second Ctrl-C cancels the shutdown itself (logged as text, without exc_info)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], asyncio.CancelledError):
            return False
        text = record.getMessage()
        return not ("Traceback" in text and ("CancelledError" in text or "KeyboardInterrupt" in text))


class AnnouncedServer(uvicorn.Server):
    """uvicorn's server that says it serves once it listens (a wrapper waiting for the line can connect at once),
    and says so when it stops: how long requests in flight may still take, and that a second Ctrl-C closes them."""

    def __init__(self, config: uvicorn.Config, ready_line: str):
        super().__init__(config)
        self.ready_line = ready_line

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            print(self.ready_line, flush=True)

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit:
            again = "; Ctrl-C again to close them now" if sig == signal.SIGINT else ""
            print(f"Stopping: requests in flight get up to {self.config.timeout_graceful_shutdown} s "
                  f"(--shutdown_timeout_s){again}", flush=True)
        super().handle_exit(sig, frame)


def check_access(host: str, api_key: Optional[str]) -> None:
    """An --api_key a client can send (not empty, no spaces around it: header values lose them; printable ASCII),
    and one at all when --host is not a loopback address."""
    if api_key is not None and (not api_key.strip() or api_key != api_key.strip()):
        raise UserError("--api_key must be a token without spaces around it (an empty or all-space key cannot be "
                        "sent in an Authorization header)")
    if api_key is not None and not (api_key.isascii() and api_key.isprintable()):
        # HTTP clients send header values as Latin-1 (Python's http.client) or UTF-8 (curl): only ASCII is one key
        raise UserError("--api_key must be printable ASCII (other characters reach the server as different bytes "
                        "from different HTTP clients)")
    if not is_loopback(host) and not api_key:
        raise UserError(f"--host {host} is reachable from other machines: pass --api_key to require a bearer "
                        "token, or bind 127.0.0.1")


def server_url(host: str, port: int) -> str:
    """The URL clients reach host:port at (an IPv6 address in brackets)."""
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def main():
    args = parse_args((ServerArguments,))[0]
    check_access(args.host, args.api_key)
    sock = bind_socket(args.host, args.port)
    path = args.reward_name_or_path
    if path is None:
        if not (DEMO_CHECKPOINT / "config.json").exists():
            raise UserError("no --reward_name_or_path given and no demo checkpoint: run `make demo` (it writes "
                            f"{DEMO_CHECKPOINT.relative_to(REPO_ROOT)}) or pass --reward_name_or_path DIR")
        path = str(DEMO_CHECKPOINT)
    if args.normalize_reward:  # said before the model loads; the kind and the scale are in config.json
        reward_scale(checkpoint_kind(path), PretrainedConfig.get_config_dict(path)[0], path)
    scorer = RewardScorer.from_pretrained(path, max_length=args.max_length, batch_size=args.batch_size, bf16=args.bf16,
                                          attn_implementation=args.attn_implementation,
                                          trust_remote_code=args.trust_remote_code,
                                          pickled_weights=args.load_pickled_weights,
                                          max_tokens_per_batch=args.max_tokens_per_batch)
    config = uvicorn.Config(build_app(scorer, args, path), log_level="warning",
                            timeout_graceful_shutdown=args.shutdown_timeout_s)
    logging.getLogger("uvicorn.error").addFilter(CancelledAtShutdown())
    server = AnnouncedServer(config, f"Serving {KINDS[scorer.kind]} {path} on {server_url(args.host, args.port)} "
                                     f"({'bearer token required' if args.api_key else 'no authentication'})")
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn re-raises Ctrl-C once it has stopped (a second one cut the wait short)
        print("Stopped (Ctrl-C)", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main)
