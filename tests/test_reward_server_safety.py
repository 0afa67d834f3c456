"""The reward server under bad, hostile or unlucky input: no request crashes it, fails another request batched with
it, or sees another request's data; every error is one JSON line. Each test here failed before its fix (the
fuzzing review's defects), on tiny checkpoints built here: BT and PM (helpers.save_sharp_checkpoints), an ArmoRM
assembled from the tiny model, a BERT encoder with a small learned position table."""

import asyncio
import gzip
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from test_reward_server import ANSWERS, CONVERSATIONS, QUESTION, eval_path_rewards, raw_post
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForSequenceClassification,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from helpers import Server, character_bert_tokenizer, save_sharp_checkpoints, save_tiny_armo
from useful_code import reward_scorer
from useful_code.cli import UserError
from useful_code.pm_scoring import knockout_tournaments
from useful_code.reward_client import RewardClient, RewardServerError
from useful_code.reward_scorer import learned_position_limit
from useful_code.serve_reward_model import DynamicBatcher, bearer_token_matches, check_access

LONG = [QUESTION, {"role": "assistant", "content": "bread " * 400}]  # ~800 tokens of the tiny tokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("serve_safety")
    save_sharp_checkpoints(out, seed=2)
    return out


@pytest.fixture(scope="module")
def armo(tmp_path_factory):
    """A tiny ArmoRM as armo-rm/export.py writes one (helpers.save_tiny_armo)."""
    return save_tiny_armo(tmp_path_factory.mktemp("armo") / "model")


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    """A BERT reward model whose learned position table has 64 rows (the server's default --max_length is 4096)."""
    out = tmp_path_factory.mktemp("bert")
    tokenizer = character_bert_tokenizer(out)
    tokenizer.chat_template = ("{% for message in messages %}{{ message['role'] | capitalize + ': ' + "
                               "message['content'] + '\\n' }}{% endfor %}")
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=1, pad_token_id=0)
    torch.manual_seed(0)
    BertForSequenceClassification(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def post_many(url: str, requests: list[tuple[str, dict]], threads: int = 8) -> list[tuple[int, dict]]:
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(lambda r: raw_post(url + r[0], json.dumps(r[1]).encode()), requests))


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> bytes:
    """Send raw bytes, read until the server closes the connection (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except TimeoutError:
            pass
    return out


def status_and_error(response: bytes) -> tuple[int, str]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), json.loads(body)["error"]


# 1. ArmoRM without its gating pattern; a gathered batch that fails


def test_armo_input_without_a_user_turn_is_a_400_and_fails_no_other_request(armo):
    good = ("/score", {"conversations": [[QUESTION, {"role": "assistant", "content": "Knead and bake."}]]})
    cases = [("/get_reward", {"query": ["hello"]}, "query 0 does not hold the gating pattern", "do not meet"),
             ("/score", {"conversations": [CONVERSATIONS[0], [QUESTION, {"role": "assistant",
                                                                      "content": "bread " * 400}]]},
              "conversations[1] does not hold the gating pattern",
              "cut from the left to max_length=64")]
    with Server(armo, trust_remote_code=True, max_length=64, batch_wait_ms=300) as server:
        for endpoint, body, message, why in cases:
            code, answer = raw_post(server.url + endpoint, json.dumps(body).encode())
            assert code == 400 and message in answer["error"] and why in answer["error"], answer
            assert "(no_user_turn_for_gating)" in answer["error"]
        alone = RewardClient(server.url).score(good[1]["conversations"])
        results = post_many(server.url, [good] * 4 + [("/get_reward", {"query": ["hello"]})] + [good] * 3)
    assert [code for code, _ in results] == [200] * 4 + [400] + [200] * 3
    for code, answer in results[:4] + results[5:]:
        np.testing.assert_allclose(answer["rewards"], alone["rewards"], atol=1e-5)
        np.testing.assert_allclose(answer["attribute_rewards"], alone["attribute_rewards"], atol=1e-5)


def test_a_failing_gathered_batch_is_scored_again_request_by_request(armo):
    """The model itself fails on the one bad input (the encode check switched off): the others still get their
    rewards, and the bad one a JSON 500 without the model's message."""
    good = ("/score", {"conversations": [[QUESTION, {"role": "assistant", "content": "Knead and bake."}]]})
    with Server(armo, trust_remote_code=True, batch_wait_ms=500) as server:
        server.scorer.check_gating = lambda *args, **kwargs: None
        results = post_many(server.url, [good] * 3 + [("/get_reward", {"query": ["hello"]})] + [good] * 3)
        assert RewardClient(server.url).health() == {"status": "ok"}
    # How the seven requests were gathered depends on timing (a loaded machine splits them differently): the
    # batcher's re-scoring itself is counted by test_the_batcher_fails_only_the_request_at_fault.
    assert [code for code, _ in results] == [200] * 3 + [500] + [200] * 3
    error = results[3][1]["error"]
    assert "internal server error (ValueError)" in error and "gating pattern" not in error and "\n" not in error


def test_the_batcher_fails_only_the_request_at_fault():
    calls = []

    def score(sequences):
        calls.append(len(sequences))
        if [666] in sequences:
            raise ValueError("bad input")
        return {"rewards": [float(sum(s)) for s in sequences]}

    async def scenario():
        batcher = DynamicBatcher(score, wait_s=2.0, max_tokens=10 ** 6)
        task = asyncio.create_task(batcher.serve_forever())
        batcher.in_flight = 3  # three requests on their way: gathered into one batch
        results = await asyncio.gather(batcher.submit([[1], [2]]), batcher.submit([[666]]), batcher.submit([[3]]),
                                       return_exceptions=True)
        task.cancel()
        batcher.worker.shutdown(wait=False)
        return results

    first, bad, last = asyncio.run(scenario())
    assert calls[0] == 4 and sorted(calls[1:]) == [1, 1, 2]
    assert first == {"rewards": [1.0, 2.0]} and last == {"rewards": [3.0]} and isinstance(bad, ValueError)


# 2. A learned position table below --max_length


def test_learned_position_limit_per_model_type():
    tiny = {"hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32,
            "vocab_size": 100}
    roberta = RobertaForSequenceClassification(RobertaConfig(**tiny, max_position_embeddings=66, pad_token_id=1))
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=16, n_layer=1, n_head=2, vocab_size=100, n_positions=48))
    llama = LlamaForSequenceClassification(LlamaConfig(**tiny, max_position_embeddings=32))
    assert learned_position_limit(roberta) == 64  # positions start after the padding index
    assert learned_position_limit(gpt2) == 48
    assert learned_position_limit(llama) is None  # rotary positions: runs past max_position_embeddings


def test_an_encoder_is_cut_to_its_position_table_not_failed(bert, capsys):
    long = [QUESTION, {"role": "assistant", "content": "a " * 200}]
    with Server(bert) as server:  # default --max_length 4096
        assert "note: max_length 4096 is over the 64 positions" in capsys.readouterr().out
        info = RewardClient(server.url).info()
        assert info["max_length"] == 64 and info["model_position_limit"] == 64
        short = ("/score", {"conversations": [CONVERSATIONS[0]]})
        results = post_many(server.url, [short] * 3 + [("/score", {"conversations": [long]})] + [short] * 3)
    assert [code for code, _ in results] == [200] * 7
    assert results[3][1]["extra_logs"]["rm_truncated"] == 1 and results[0][1]["extra_logs"]["rm_truncated"] == 0
    assert results[3][1]["rewards"] == pytest.approx(eval_path_rewards(bert, [long], max_length=64), abs=1e-5)


# 3. Lone surrogates; anything unexpected


def test_lone_surrogates_are_a_422_naming_the_field(checkpoints):
    cases = [("/get_reward", b'{"query": ["fine", "x\\ud800"]}', "query.1: holds a lone surrogate (U+D800"),
             ("/score", (b'{"conversations": [[{"role": "user", "content": "x\\udfffy"}, '
                         b'{"role": "assistant", "content": "y"}]]}'), "conversations.0.0.content: holds a lone"),
             ("/score", (b'{"conversations": [[{"role": "\\ud800", "content": "x"}, '
                         b'{"role": "assistant", "content": "y"}]]}'), "conversations.0.0.role: holds a lone")]
    with Server(checkpoints / "bt") as server:
        for endpoint, body, message in cases:
            code, answer = raw_post(server.url + endpoint, body)
            assert code == 422 and message in answer["error"], answer
        pair = (b'{"conversations": [[{"role": "user", "content": "\\ud83c\\udf5e"}, '
                b'{"role": "assistant", "content": "y"}]]}')
        assert raw_post(server.url + "/score", pair)[0] == 200  # an escaped surrogate pair is one character
    with Server(checkpoints / "pm") as server:
        code, answer = raw_post(server.url + "/compare", b'{"context": [{"role": "user", "content": "x"}], '
                                                         b'"responses": ["a", "b\\udc00"]}')
        assert code == 422 and "responses.1: holds a lone surrogate" in answer["error"]


def test_an_unexpected_error_is_one_json_line_and_the_server_stays_up(checkpoints):
    with Server(checkpoints / "bt") as server:
        def broken(texts):
            raise TypeError("secret detail of the tokenizer")
        server.scorer.encode_texts = broken
        code, answer = raw_post(server.url + "/get_reward", json.dumps({"query": ["hello"]}).encode())
        assert code == 500 and answer["error"].startswith("internal server error (TypeError) on /get_reward")
        assert "secret" not in answer["error"]
        assert RewardClient(server.url).score(CONVERSATIONS[:1])["rewards"]


# 4, 7. /compare: each request's own truncation count, once per sequence; --max_responses; the winner


def test_compare_counts_only_its_own_truncation_once_per_sequence(checkpoints):
    short = {"context": [QUESTION], "responses": ["Knead it.", "No."]}
    long = {"context": [QUESTION], "responses": ["flour " * 100, "water " * 100, "yeast", "salt"]}
    with Server(checkpoints / "pm", max_length=128, max_responses=4) as server:
        info = RewardClient(server.url).info()
        assert info["limits"]["max_responses"] == 4
        two_long = RewardClient(server.url).compare([QUESTION], ["flour " * 100, "water " * 100])
        assert two_long["extra_logs"]["rm_truncated"] == 2  # its two sequences (the pair in both orders), once each
        alone = RewardClient(server.url).compare(long["context"], long["responses"])
        # 5 of the 6 pairs hold a long response, each in both orders; the knock-out adds no sequences of its own
        assert alone["extra_logs"]["rm_truncated"] == 10
        results = post_many(server.url, [("/compare", short if i % 2 else long) for i in range(16)])
        code, answer = raw_post(server.url + "/compare", json.dumps({"context": [QUESTION],
                                                                      "responses": ANSWERS + ["more"]}).encode())
        assert code == 413 and "responses: 5 items, over --max_responses=4" in answer["error"]
    for i, (code, answer) in enumerate(results):
        assert code == 200 and answer["extra_logs"]["rm_truncated"] == (0 if i % 2 else 10), (i, answer)


def test_compare_responses_are_held_to_max_items_when_it_is_the_lower_bound(checkpoints):
    """--max_items bounds /compare's responses too: below --max_responses (default 32) it is the limit named."""
    with Server(checkpoints / "pm", max_items=2) as server:
        body = {"context": [QUESTION], "responses": ANSWERS[:3]}
        code, answer = raw_post(server.url + "/compare", json.dumps(body).encode())
        assert code == 413 and "responses: 3 items, over --max_items=2" in answer["error"]
        code, answer = raw_post(server.url + "/compare", json.dumps({**body, "responses": ANSWERS[:2]}).encode())
    assert code == 200 and len(answer["probabilities"]) == 2


def knockout_winner(p: list[list[float]]) -> int:
    """The knock-out bracket played on a preference matrix, as /compare plays it."""
    return knockout_tournaments([len(p)], lambda pairings: [p[i][j] for _, i, j in pairings])[0].winner


def test_the_winner_is_the_knockout_played_on_the_matrix():
    p = [[0.5, 0.7, 0.2], [0.3, 0.5, 0.9], [0.8, 0.1, 0.5]]  # 0 beats 1; then 0 meets the bye 2 and loses
    assert knockout_winner(p) == 2
    assert knockout_winner([[0.5, 0.5], [0.5, 0.5]]) == 0  # a tie goes to the earlier response
    four = [[0.5, 0.4, 0.9, 0.9], [0.6, 0.5, 0.3, 0.9], [0.1, 0.7, 0.5, 0.6], [0.1, 0.1, 0.4, 0.5]]
    assert knockout_winner(four) == 2  # 1 beats 0, 2 beats 3, then 2 beats 1
    assert knockout_winner([[0.5]]) == 0


# 5. Authorisation and the body: a stalled upload is neither waited for nor kept


def test_a_stalled_upload_delays_nobody_and_gets_a_408(checkpoints):
    with Server(checkpoints / "bt", batch_wait_ms=1500, body_timeout_s=1.0) as server:
        port, client = server.args.port, RewardClient(server.url)
        client.score(CONVERSATIONS[:1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as stalled:
            stalled.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                            b"Content-Length: 1000\r\n\r\n{")
            time.sleep(0.1)
            started = time.time()
            client.score(CONVERSATIONS[:1])
            assert time.time() - started < 1.0  # not --batch_wait_ms=1500 waiting for the stalled body
            out = b""
            while chunk := stalled.recv(65536):  # the server answers, then closes the connection
                out += chunk
        code, error = status_and_error(out)
        assert code == 408 and "--body_timeout_s=1.0" in error


def test_auth_comes_first_and_the_bearer_scheme_is_case_insensitive(checkpoints):
    body = json.dumps({"conversations": CONVERSATIONS[:1]}).encode()
    with Server(checkpoints / "bt", api_key="s3cret") as server:
        url, port = server.url, server.args.port
        assert raw_post(url + "/score", b"{bad")[0] == 401  # not a 422 to a client without the key
        for scheme in ("bearer", "BEARER", "Bearer"):
            assert raw_post(url + "/score", body, {"Authorization": f"{scheme} s3cret"})[0] == 200
        for wrong in ("Basic s3cret", "s3cret", "Bearer s3cre", "Bearer s3cretX"):
            assert raw_post(url + "/score", body, {"Authorization": wrong})[0] == 401
        # a stalled upload without the key is refused at once, its body never waited for
        out = raw_exchange(port, b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                                 b"Content-Length: 1000\r\n\r\n{", timeout=5)
        assert status_and_error(out)[0] == 401
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert status_and_error(raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close"
                                                       "\r\n\r\n".encode()))[0] == 401
            answer = raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer s3cret\r\n"
                                        "Connection: close\r\n\r\n".encode())
            assert status_and_error(answer)[0] == 404  # not served at all
    two = [(b"authorization", b"Bearer wrong"), (b"authorization", b"Bearer s3cret")]
    assert not bearer_token_matches(two, "s3cret") and bearer_token_matches(two[1:], "s3cret")
    for key in ("", "   ", " s3cret"):
        with pytest.raises(UserError, match="--api_key must be a token"):
            check_access("127.0.0.1", key)
    for key in ("clé", "ключ", "tab\there"):  # http.client sends Latin-1, curl UTF-8: never one key for both
        with pytest.raises(UserError, match="--api_key must be printable ASCII"):
            check_access("127.0.0.1", key)


def test_info_needs_the_bearer_token_and_health_does_not(checkpoints):
    """/info (the model, its limits) is behind the token like every endpoint but /health."""
    with Server(checkpoints / "bt", api_key="s3cret") as server:
        with pytest.raises(RewardServerError, match="HTTP 401"):
            RewardClient(server.url).info()
        assert RewardClient(server.url, api_key="s3cret").info()["limits"]["max_items"] == 512
        assert RewardClient(server.url).health() == {"status": "ok"}


def test_a_body_of_exactly_max_body_bytes_is_read_and_one_byte_more_is_a_413(checkpoints):
    """--max_body_bytes is the largest body accepted: that many bytes are scored, one more is refused unread."""
    def body_of(pad: int) -> bytes:
        return json.dumps({"conversations": CONVERSATIONS[:1], "pad": "x" * pad}).encode()

    limit = len(body_of(100))
    with Server(checkpoints / "bt", max_body_bytes=limit) as server:
        code, answer = raw_post(server.url + "/score", body_of(100))
        assert code == 200 and len(answer["rewards"]) == 1
        code, answer = raw_post(server.url + "/score", body_of(101))
    assert code == 413 and f"request body of {limit + 1} bytes is over --max_body_bytes={limit}" in answer["error"]


def test_body_errors_are_one_line_422s_and_content_type_is_asked_for(checkpoints):
    good = json.dumps({"conversations": CONVERSATIONS[:1]}).encode()
    cases = [
        (b'{"conversations": [], "x": 1' + b"0" * 5000 + b"}", "the body is not valid JSON (a number has too many"),
        (b'{"x":' + b"[" * 100000 + b"]" * 100000 + b"}", "the body is not valid JSON (nested too deeply)"),
        (b'{"conversations": [[{"role": "user", "content": "caf\xe9"}]]}', "the body is not valid JSON (not UTF-8"),
        (gzip.compress(good), "the body is not valid JSON (not UTF-8 text; Content-Encoding gzip is not supported)"),
        (b"", "the body is not valid JSON (it is empty)"),
        (b"[]", "body: must be a JSON object"),
    ]
    with Server(checkpoints / "bt", max_body_bytes=1_000_000) as server:
        for body, message in cases:
            headers = {"Content-Encoding": "gzip"} if body[:2] == b"\x1f\x8b" else {}
            code, answer = raw_post(server.url + "/score", body, headers)
            assert code == 422 and answer["error"].startswith(message), (body[:30], answer)
        for content_type in ("text/plain", "application/x-www-form-urlencoded"):
            code, answer = raw_post(server.url + "/score", good, {"Content-Type": content_type})
            assert code == 415 and answer["error"].startswith("send Content-Type: application/json")
        out = raw_exchange(server.args.port, b"POST /score HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                                             b"Content-Length: %d\r\n\r\n" % len(good) + good)
        assert status_and_error(out) == (415, "send Content-Type: application/json (the body is a JSON object)")


# 6. Preparing runs off the event loop; messages per conversation are bounded


def test_preparing_runs_off_the_event_loop_and_messages_are_bounded(checkpoints):
    many = [QUESTION, {"role": "assistant", "content": "a"}] * 3
    with Server(checkpoints / "bt", max_messages=4) as server:
        threads, encode = [], server.scorer.encode_conversations

        def recording(*args, **kwargs):
            threads.append(threading.current_thread().name)
            return encode(*args, **kwargs)

        server.scorer.encode_conversations = recording
        assert RewardClient(server.url).score(CONVERSATIONS[:1])["rewards"]
        code, answer = raw_post(server.url + "/score", json.dumps({"conversations": [many]}).encode())
        assert RewardClient(server.url).info()["limits"]["max_messages"] == 4
    assert threads and all(name.startswith("preparing") for name in threads)
    assert code == 413 and "conversations[0]: 6 messages, over --max_messages=4" in answer["error"]


# 8. NaN among ArmoRM's attribute rewards with a finite reward


def test_nan_attribute_rewards_are_the_json_500_not_a_rendering_failure(armo, monkeypatch):
    armo_outputs = reward_scorer._armo_outputs

    def with_nan(outputs):
        values = armo_outputs(outputs).clone()
        values[:, 1] = float("nan")  # the first attribute reward; the score (column 0) stays finite
        return values

    monkeypatch.setattr(reward_scorer, "_armo_outputs", with_nan)
    with Server(armo, trust_remote_code=True) as server:
        code, answer = raw_post(server.url + "/score", json.dumps({"conversations": CONVERSATIONS[:2]}).encode())
        assert RewardClient(server.url).health() == {"status": "ok"}
    assert code == 500 and "NaN or infinite attribute_rewards for items [0, 1]" in answer["error"]
