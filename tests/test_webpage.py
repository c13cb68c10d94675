"""The chat page at `/` in headless Chromium (Debian's chromium + chromium-driver, through selenium):
it shows the model, sends a message, streams the reply (the same text the API gives), keeps the
conversation for the next turn. Skipped, not failed, where Chromium or selenium is missing
(`.ci/run` installs them)."""

import copy
import json
import shutil
import threading

import pytest
import torch
from inference_fixtures import shared_model_dir

from minilab.inference import Engine, SamplingParams
from minilab.serve.app import create_app, running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and DRIVER),
                                reason="needs Chromium and chromedriver (apt-get install chromium chromium-driver)")


@pytest.fixture()
def browser():
    webdriver = pytest.importorskip("selenium.webdriver", reason="needs selenium (pip install -e '.[dev]')")
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        opts.add_argument(arg)
    # An explicit driver path: selenium never tries to download one.
    driver = webdriver.Chrome(service=Service(executable_path=DRIVER), options=opts)
    driver.set_script_timeout(30)
    yield driver
    driver.quit()


class Gate:
    """Holds the reply after its first delta until released, so the test sees it mid-stream."""

    def __init__(self, engine: Engine):
        self.engine, self.first_sent, self.release = engine, threading.Event(), threading.Event()

    def reply(self, ids, params, chat=False):
        r = Engine.reply(self.engine, ids, params, chat=chat)
        push, sent = r.push, []

        def gated(token_id):  # the decoder hands every token through here, batched or not
            delta = push(token_id)
            if delta is not None:
                if len(sent) == 1:  # the first delta is out: hold the second
                    self.first_sent.set()
                    self.release.wait(20)
                sent.append(delta)
            return delta

        r.push = gated
        return r


def test_chat_page_streams_and_keeps_the_conversation(browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _drive(browser, By, WebDriverWait)
    finally:
        torch.set_num_threads(threads)


def _drive(browser, By, WebDriverWait):
    engine = Engine.load(str(shared_model_dir()))
    gate = Gate(engine)
    gated = copy.copy(engine)
    gated.reply = gate.reply
    with running_server(create_app(gated)) as url:
        browser.get(url + "/")
        wait = WebDriverWait(browser, 20)
        wait.until(lambda d: engine.name in d.find_element(By.ID, "model-name").text)
        for field, value in (("temperature", "0"), ("max-tokens", "12")):
            box = browser.find_element(By.ID, field)
            box.clear()
            box.send_keys(value)
        browser.find_element(By.ID, "input").send_keys("the cat sat")
        browser.find_element(By.ID, "send").click()
        assert gate.first_sent.wait(20)
        # Mid-stream: the bubble already shows the first delta and is still streaming.
        bubble = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, ".msg.assistant"))
        assert bubble.get_attribute("data-state") == "streaming"
        gate.release.set()
        wait.until(lambda d: bubble.get_attribute("data-state") == "done")
        reply = browser.execute_script("return history[1].content")
        messages = [{"role": "user", "content": "the cat sat"}]
        expect = engine.complete(engine.chat_prompt(messages), SamplingParams(max_tokens=12), chat=True)[0]
        assert reply == expect
        # The second turn sends the whole conversation.
        browser.find_element(By.ID, "input").send_keys("and then")
        browser.find_element(By.ID, "send").click()
        wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]")) == 2)
        history = json.loads(browser.execute_script("return JSON.stringify(history)"))
        assert [m["role"] for m in history] == ["user", "assistant", "user", "assistant"]
        messages += [{"role": "assistant", "content": expect}, {"role": "user", "content": "and then"}]
        assert history[3]["content"] == engine.complete(engine.chat_prompt(messages), SamplingParams(max_tokens=12),
                                                        chat=True)[0]


def test_chat_page_keeps_a_10_turn_conversation_going_on_a_short_context(browser):
    """Issue 15: on a 256-token model the second message failed ('max_tokens 128 is out of range').
    The page sends truncation "auto": 10 turns on a 128-token model, every one answered, no error
    shown, and a notice (not an error) says older messages were dropped."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    engine = Engine.load(str(shared_model_dir()))
    try:
        with running_server(create_app(engine)) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 30)
            wait.until(lambda d: engine.name in d.find_element(By.ID, "model-name").text)
            box = browser.find_element(By.ID, "temperature")
            box.clear()
            box.send_keys("0")
            for turn in range(1, 11):
                browser.find_element(By.ID, "input").send_keys(f"the cat sat on the mat number {turn} and then")
                browser.find_element(By.ID, "send").click()
                wait.until(lambda d, n=turn: len(d.find_elements(By.CSS_SELECTOR, ".msg.assistant[data-state=done]"))
                           == n or d.find_elements(By.CSS_SELECTOR, ".msg.error"))
                assert not browser.find_elements(By.CSS_SELECTOR, ".msg.error"), \
                    browser.find_element(By.CSS_SELECTOR, ".msg.error").text
            notices = [n.text for n in browser.find_elements(By.CSS_SELECTOR, ".msg.notice")]
            assert notices and all("to fit the model's 128-token context" in n or "reply limited" in n
                                   for n in notices)
            assert any("dropped" in n for n in notices)
            history = json.loads(browser.execute_script("return JSON.stringify(history)"))
            # the page sends only what the server kept: the last request fitted without dropping it all
            assert history[-2:][0]["role"] == "user" and len(history) < 20
            assert len(engine.chat_prompt(history[:-1])) < engine.context_length
    finally:
        torch.set_num_threads(threads)
