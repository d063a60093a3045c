"""serve.py, through the official openai client and a real browser: replies equal the model's own greedy tokens,
streamed or not; n, seeds, stop strings and usage as OpenAI defines them; errors with OpenAI's shape and status;
16 concurrent clients each get exactly what they get alone; a client that goes away stops its generation."""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
import torch
import uvicorn

import engine
import serve
from chat import CHAT_STOP_IDS, chat_prompt
from checkpoint import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url, process=None):
    for _ in range(300):
        if process is not None and process.poll() is not None:
            raise AssertionError(f"serve.py exited: {process.stderr.read()}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1) as response:
                return json.load(response)
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"{url} did not come up")


@pytest.fixture(scope="module")
def server(addition_sft):
    """serve.py in a process of its own, as a user starts it: (base url, checkpoint)."""
    ckpt = addition_sft[0]
    port = free_port()
    process = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), "--ckpt", ckpt, "--port", str(port),
                                "--model_name", "adder"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url, ckpt
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def model(server):
    return load_model(server[1], "cpu")


def greedy(model, tokenizer, prompt, n, stop_ids):
    """The reference: full forwards without a cache, the argmax each time; the new tokens and the stop id if any."""
    new = []
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([prompt + new]))[0][0, -1].argmax())
            new.append(token)
            if token in stop_ids:
                break
    return new


def ask(question):
    return [{"role": "user", "content": question}]


def test_chat_replies_are_the_models_greedy_tokens_streamed_or_not(client, model):
    assert [m.id for m in client.models.list()] == ["adder"]
    for question in ("What is 2 + 3?", "What is 4 + 4?"):
        prompt = chat_prompt(model[1], ask(question))
        tokens = greedy(*model, prompt, 64 - len(prompt), CHAT_STOP_IDS)
        assert tokens[-1] in CHAT_STOP_IDS, "the fine-tuned model should end its reply"
        reply = client.chat.completions.create(model="adder", messages=ask(question), temperature=0)
        assert reply.choices[0].message.content == model[1].decode(tokens[:-1])
        assert reply.choices[0].finish_reason == "stop" and reply.choices[0].message.role == "assistant"
        assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (len(prompt), len(tokens))
        chunks = list(client.chat.completions.create(model="adder", messages=ask(question), temperature=0,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(tokens)


def test_n_choices_seeds_and_stop_strings(client, model):
    prompt = "def "
    ids = model[1].encode(prompt)
    tokens = greedy(*model, ids, 12, ())
    text = model[1].decode(tokens)
    plain = client.completions.create(model="adder", prompt=prompt, max_tokens=12, temperature=0)
    assert plain.choices[0].text == text and plain.choices[0].finish_reason == "length"
    stop = text[5:8]
    assert stop.strip() and text.find(stop) == 5, "pick a stop string that first occurs at character 5"
    for stream in (False, True):
        cut = client.completions.create(model="adder", prompt=prompt, max_tokens=12, temperature=0, stop=[stop],
                                        stream=stream)
        if stream:
            pieces = [(c.choices[0].text, c.choices[0].finish_reason) for c in cut]
            assert "".join(p for p, _ in pieces) == text[:5] and pieces[-1][1] == "stop"
        else:
            assert cut.choices[0].text == text[:5] and cut.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="adder", prompt=prompt, max_tokens=12, temperature=1.0, n=3, seed=11)
               for _ in range(2)]
    texts = [[c.text for c in sorted(s.choices, key=lambda c: c.index)] for s in sampled]
    assert texts[0] == texts[1] and len(set(texts[0])) == 3 and sampled[0].usage.completion_tokens == 36
    chat = client.chat.completions.create(model="adder", messages=ask("What is 1 + 2?"), temperature=0, n=2)
    assert len(chat.choices) == 2 and chat.choices[0].message.content == chat.choices[1].message.content


def test_sixteen_concurrent_clients_get_what_each_gets_alone(trained_ckpt, monkeypatch):
    in_flight, decode, step = [], engine.Engine.decode, engine.Engine.step
    monkeypatch.setattr(engine.Engine, "decode", lambda self: in_flight.append(len(self.active())) or decode(self))
    # The concurrent round starts only once all 16 wait, so they are decoded together however busy the machine is.
    gate = threading.Event()
    gate.set()

    def gated_step(self):
        if len(self.waiting) == 16:
            gate.set()
        return step(self) if gate.wait(0.01) else True

    monkeypatch.setattr(engine.Engine, "step", gated_step)
    prompts = [f"def f{i}(x):\n    return x" + " +" * (i % 4) for i in range(16)]
    # Half greedy, half sampled with a seed (which also depends on every logit); the pretrained model, not the
    # adder, which answers every prompt alike.
    settings = [dict(temperature=0) if i % 2 else dict(temperature=1.0, seed=i) for i in range(16)]
    with InProcess(load_model(trained_ckpt, "cpu"), max_batch=16) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)

        def complete(i):
            return client.completions.create(model="adder", prompt=prompts[i], max_tokens=24,
                                             **settings[i]).choices[0].text

        alone = [complete(i) for i in range(16)]
        assert max(in_flight) == 1
        gate.clear()
        with ThreadPoolExecutor(16) as pool:
            together = list(pool.map(complete, range(16)))
    assert together == alone and len(set(alone)) > 4
    assert max(in_flight) == 16, "the clients should have been decoded together"


def post(url, body: bytes, headers=None):
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def test_bad_requests_get_openai_errors_and_the_server_lives_on(server, client):
    url = server[0]
    status, body = post(url + "/v1/chat/completions", b'{"model": "adder", "messages": [')
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    cases = [(dict(temperature=3), openai.BadRequestError, "temperature"),
             (dict(model="gpt-9"), openai.NotFoundError, "model_not_found"),
             (dict(messages=ask("x " * 100)), openai.BadRequestError, "context_length_exceeded"),
             (dict(max_tokens=60), openai.BadRequestError, "context_length_exceeded"),
             (dict(n=17), openai.BadRequestError, "n"),
             (dict(messages=[{"role": "robot", "content": "hi"}]), openai.BadRequestError, "messages.0.role"),
             (dict(stop=[""]), openai.BadRequestError, "stop")]
    for change, error, expected in cases:
        with pytest.raises(error) as e:
            client.chat.completions.create(**{"model": "adder", "messages": ask("hi"), **change})
        assert expected in json.dumps(e.value.body), change
    status, body = post(url + "/v1/nothing", b"{}")
    assert status == 404 and "error" in body
    assert client.chat.completions.create(model="adder", messages=ask("What is 2 + 3?"), temperature=0).choices


class InProcess:
    """serve.py's app in this process (uvicorn in a thread), so a test can hold the engine back."""

    def __init__(self, model_and_tokenizer, **options):
        api_key = options.pop("api_key", None)
        eng = engine.Engine(*model_and_tokenizer, **options)
        self.app = serve.create_app(serve.Server(eng, "adder", api_key))
        self.server = uvicorn.Server(uvicorn.Config(self.app, port=free_port(), log_level="warning"))
        self.url = f"http://127.0.0.1:{self.server.config.port}"
        self.engine = eng

    def __enter__(self):
        self.thread = threading.Thread(target=self.server.run)
        self.thread.start()
        wait_until_up(self.url)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join()


def test_a_full_queue_is_503_and_a_wrong_key_401(model, monkeypatch):
    released = threading.Event()
    step = engine.Engine.step
    monkeypatch.setattr(engine.Engine, "step", lambda self: released.wait() and step(self))
    with InProcess(model, max_batch=1, max_queue=0, api_key="sesame") as s:
        keyed = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
        with ThreadPoolExecutor(1) as pool:
            try:
                first = pool.submit(keyed.chat.completions.create, model="adder", messages=ask("What is 2 + 3?"),
                                    temperature=0)
                while not s.engine.waiting:  # the first holds the only row the engine will have
                    time.sleep(0.01)
                with pytest.raises(openai.InternalServerError) as e:
                    keyed.chat.completions.create(model="adder", messages=ask("What is 1 + 1?"))
                assert e.value.status_code == 503 and e.value.response.headers["retry-after"] == "1"
            finally:
                released.set()
            assert first.result().choices[0].finish_reason == "stop"


def test_a_client_that_disconnects_stops_its_generation(model, monkeypatch):
    step = engine.Engine.step
    monkeypatch.setattr(engine.Engine, "step", lambda self: time.sleep(0.02) or step(self))  # 50 tokens/s at most
    with InProcess(model, max_batch=2) as s:
        client = openai.OpenAI(base_url=s.url + "/v1", api_key="unused", max_retries=0)
        stream = client.completions.create(model="adder", prompt="def ", max_tokens=60, stream=True)
        next(iter(stream))
        stream.close()
        for _ in range(100):  # 60 tokens would take 1.2 s; the cancel comes at the next token sent
            if s.engine.cancelled == 1 and not s.engine.active():
                break
            time.sleep(0.02)
        assert s.engine.cancelled == 1 and not s.engine.active()


def chromium():
    """Debian's chromium and chromedriver (apt install chromium chromium-driver; .ci/run installs them)."""
    from selenium import webdriver

    driver_path, browser = shutil.which("chromedriver"), shutil.which("chromium")
    assert driver_path and browser, "the browser test needs Debian's chromium and chromium-driver packages"
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver_path))


def test_the_web_page_chats_with_streaming_and_keeps_the_conversation(server, client):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    browser = chromium()
    try:
        browser.get(server[0] + "/")
        wait = WebDriverWait(browser, 30)
        wait.until(lambda b: b.find_element(By.ID, "model").text == "adder")
        temperature = browser.find_element(By.ID, "temperature")
        temperature.clear()
        temperature.send_keys("0")
        history = []
        for question in ("What is 2 + 3?", "What is 3 + 4?"):
            history += ask(question)
            expected = client.chat.completions.create(model="adder", messages=history, temperature=0)
            n_before = len(browser.find_elements(By.CSS_SELECTOR, ".assistant"))
            browser.find_element(By.ID, "input").send_keys(question + "\n")
            wait.until(lambda b: not b.find_element(By.ID, "send").get_attribute("disabled")
                       and len(b.find_elements(By.CSS_SELECTOR, ".assistant")) > n_before)
            reply = browser.find_elements(By.CSS_SELECTOR, ".assistant")[-1].text
            assert reply == expected.choices[0].message.content.strip()
            history.append({"role": "assistant", "content": expected.choices[0].message.content})
            stats = browser.find_element(By.ID, "stats").text
            assert re.fullmatch(rf"{expected.usage.completion_tokens} tokens, [\d.]+ tokens/s", stats), stats
        browser.refresh()
        wait.until(lambda b: len(b.find_elements(By.CSS_SELECTOR, ".message")) == 4)
        shown = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".message")]
        assert shown == [m["content"].strip() for m in history]
    finally:
        browser.quit()
