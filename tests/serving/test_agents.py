"""The agent loop against a scripted OpenAI-compatible server on 127.0.0.1, and its tools."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from openai import OpenAI

from sfi_sglang.agents import Agent, calculator, evaluate, file_search, read_file


class FakeServer:
    """Streams scripted replies: ("text", str, finish) or ("tool", name, arguments-json)."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                kind, a, b = outer.script.pop(0)
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                for delta, finish in outer.chunks(kind, a, b):
                    self.send({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
                self.send({"choices": [], "usage": {"prompt_tokens": 100 + len(outer.requests),
                                                    "completion_tokens": 7, "total_tokens": 0}})
                self.wfile.write(b"data: [DONE]\n\n")

            def send(self, payload):
                payload = {"id": "x", "object": "chat.completion.chunk", "created": 0, "model": "m", **payload}
                self.wfile.write(f"data: {json.dumps(payload)}\n\n".encode())
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.client = OpenAI(base_url=f"http://127.0.0.1:{self.httpd.server_port}/v1", api_key="none", max_retries=0)

    @staticmethod
    def chunks(kind, a, b):
        if kind == "text":
            words = a.split(" ")
            for i, w in enumerate(words):
                yield {"role": "assistant", "content": w + (" " if i < len(words) - 1 else "")}, None
            yield {}, b
        else:  # a tool call whose arguments arrive in two pieces
            half = len(b) // 2
            yield {"tool_calls": [{"index": 0, "id": "call_7", "type": "function",
                                   "function": {"name": a, "arguments": b[:half]}}]}, None
            yield {"tool_calls": [{"index": 0, "function": {"arguments": b[half:]}}]}, None
            yield {}, "tool_calls"


@pytest.fixture
def server():
    servers = []
    yield lambda script: servers.append(FakeServer(script)) or servers[-1]
    for s in servers:
        s.httpd.shutdown()
        s.httpd.server_close()


def test_tool_call_runs_locally_and_its_result_goes_back(server):
    s = server([("tool", "calculator", json.dumps({"expression": "(3 + 4) * 2 ** 5"})),
                ("text", "The answer is 224.", "stop")])
    streamed = []
    res = Agent(s.client, "m", [calculator()], system="be brief").run("compute", on_text=streamed.append)
    assert res.stop == "answer" and res.answer == "The answer is 224." == "".join(streamed)
    assert [t.tool_calls for t in res.turns] == [["calculator"], []]
    assert [t.prompt_tokens for t in res.turns] == [101, 102] and res.turns[0].completion_tokens == 7
    assert all(t.ttft is not None and t.seconds >= t.ttft for t in res.turns)
    first, second = s.requests
    assert first["tools"][0]["function"]["name"] == "calculator" and first["stream"] is True
    assert [m["role"] for m in second["messages"]] == ["system", "user", "assistant", "tool"]
    assert second["messages"][3] == {"role": "tool", "tool_call_id": "call_7", "content": "224"}
    assert json.loads(second["messages"][2]["tool_calls"][0]["function"]["arguments"]) == {"expression": "(3 + 4) * 2 ** 5"}


def test_tool_errors_go_back_as_text_and_the_loop_stops_at_max_turns(server):
    s = server([("tool", "calculator", '{"expression": "__import__(\\"os\\")"}'), ("tool", "nope", "{}")])
    res = Agent(s.client, "m", [calculator()], max_turns=2).run("x")
    assert res.stop == "max_turns" and len(res.turns) == 2
    tool_msgs = [m["content"] for m in res.messages if m["role"] == "tool"]
    assert tool_msgs[0].startswith("error: ValueError") and tool_msgs[1] == "error: no tool named 'nope'"


def test_history_continues_a_session_and_length_stop_is_reported(server):
    s = server([("text", "one", "stop"), ("text", "two two", "length")])
    agent = Agent(s.client, "m", [], system="sys")
    first = agent.run("a")
    second = agent.run("b", history=first.messages)
    assert second.stop == "length" and second.answer == "two two"
    assert [m["content"] for m in s.requests[1]["messages"]] == ["sys", "a", "one", "b"]
    assert "tools" not in s.requests[0]


@pytest.mark.parametrize("expr, value", [("1+2*3", 7), ("(1+2)*3", 9), ("-2**2", -4), ("7//2 + 7%2", 4), ("1/4", 0.25)])
def test_calculator(expr, value):
    assert evaluate(expr) == value


@pytest.mark.parametrize("expr", ["__import__('os')", "a + 1", "2 ** 99999", "[1]", "1 +"])
def test_calculator_rejects_anything_but_arithmetic(expr):
    with pytest.raises(ValueError):
        evaluate(expr)


def test_file_tools_stay_in_their_folder(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("alpha\nThe passkey is 4711.\nomega\n")
    (tmp_path / "secret.txt").write_text("passkey 9999\n")
    root = str(tmp_path / "docs")
    assert file_search(root).fn(pattern="PASSKEY") == "a.txt:2: The passkey is 4711."
    assert file_search(root).fn(pattern="zzz") == "no matches"
    assert "stopped at 1 hits" in file_search(root, max_hits=1).fn(pattern="a")
    assert read_file(root).fn(path="a.txt", start=2, count=1) == "2: The passkey is 4711."
    with pytest.raises(ValueError, match="outside"):
        read_file(root).fn(path="../secret.txt")
