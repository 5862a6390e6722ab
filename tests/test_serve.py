"""`rglcd serve`: request checks, the models it loads (full, LoRA, teacher) and what it generates, its command-line
errors, and the page end to end in a real headless browser (Debian's chromium and chromedriver)."""

import math
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from rglcd.config import MAX_SEED, load_config
from rglcd.export import export_pipeline, save_lora
from rglcd.lora import add_lora
from rglcd.models import build_student, load_teacher
from rglcd.rewards import register_reward
from rglcd.rewards.base import RewardModel
from rglcd.sampling import lcm_sample, lcm_scheduler, to_pil
from rglcd.serve import (
    MAX_GUIDANCE,
    WARM_UP,
    RequestError,
    ServedModel,
    ServeSettings,
    check_request,
    generate,
    load_models,
    load_served_model,
    shown,
)

from .test_cli import run_main

CPU = torch.device("cpu")
GOOD = dict(prompt="a red picture", seed=3, steps=2, guidance=6.0, scheduler="lcm", eta=0.3, teacher_steps=25,
            teacher_guidance=7.5)  # fmt: skip
SERVED = [ServedModel("LCM", "lcm", None, 50, CPU), ServedModel("teacher", "teacher", None, 1000, CPU)]


def test_a_good_request_is_typed():
    request = check_request(SERVED, **{**GOOD, "prompt": "  a red picture ", "seed": 3.0, "steps": 2.0})
    assert (request.prompt, request.seed, request.steps, request.guidance) == ("a red picture", 3, 2, 6.0)
    assert isinstance(request.seed, int) and isinstance(request.steps, int)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prompt": ""}, "Type a prompt first."),
        ({"prompt": "   "}, "Type a prompt first."),
        ({"prompt": None}, "Type a prompt first."),
        ({"steps": 0}, "steps 0: give a whole number from 1 to 50"),
        ({"steps": 1000}, "steps 1000: give a whole number from 1 to 50"),
        ({"steps": 2.5}, "steps 2.5: give a whole number"),
        ({"steps": None}, "steps: give a whole number from 1 to 50"),
        ({"seed": -1}, "seed -1: give a whole number from 0 to 4294967295"),
        ({"seed": math.inf}, "seed: give a whole number"),
        ({"guidance": 85}, "guidance 85: give a number from 0 to 30"),
        ({"guidance": 85.0}, "guidance 85: give a number from 0 to 30"),  # a float as it reads, not its repr 85.0
        ({"guidance": math.nan}, "guidance nan: give a number from 0 to 30"),
        ({"guidance": None}, "guidance empty: give a number from 0 to 30"),
        ({"scheduler": "ddpm"}, "scheduler 'ddpm': choose lcm or tcd"),
        ({"eta": 1.5}, "eta 1.5: give a number from 0 to 1"),
        ({"teacher_steps": 5000}, "teacher steps 5000: give a whole number from 1 to 1000"),
        ({"teacher_guidance": -1}, "teacher guidance -1: give a number from 0 to 30"),
    ],
)
def test_bad_requests_get_a_message_naming_the_value_and_its_range(change, message):
    with pytest.raises(RequestError) as error:
        check_request(SERVED, **{**GOOD, **change})
    assert str(error.value).startswith(message)


# Each request range's two ends (field, low, high) with SERVED's limits: 50 LCM steps, 1000 teacher steps.
RANGES = [
    ("seed", 0, MAX_SEED),
    ("steps", 1, 50),
    ("guidance", 0.0, MAX_GUIDANCE),
    ("eta", 0.0, 1.0),
    ("teacher_steps", 1, 1000),
    ("teacher_guidance", 0.0, MAX_GUIDANCE),
]


@pytest.mark.parametrize("name, low, high", RANGES)
def test_each_range_takes_both_ends_and_refuses_just_past_them(name, low, high):
    """Both ends of every range are accepted as given, and the values just past them (the next whole number, or 0.01
    past a scale's end) refused with the field's message: a `<= high` turned `< high` (issue 28) or a `low <`
    turned `low <=` fails here."""
    for edge in (low, high):
        request = check_request(SERVED, **{**GOOD, name: edge})
        assert getattr(request, name) == edge and type(getattr(request, name)) is type(edge)
    whole = isinstance(low, int)
    step = 1 if whole else 0.01
    label = name.replace("_", " ")
    wanted = f"give a whole number from {low} to {high}" if whole else f"give a number from 0 to {high:g}"
    for past in (low - step, high + step):
        with pytest.raises(RequestError) as error:
            check_request(SERVED, **{**GOOD, name: past})
        assert str(error.value) == f"{label} {past if whole else format(past, 'g')}: {wanted}"


def test_the_step_limits_are_the_strictest_served_models():
    """steps: up to the shortest LCM grid (8 with no LCM served); teacher steps: up to the fewest teacher training
    steps (1000 with no teacher served)."""
    two_students = [ServedModel("a", "lcm", None, 50, CPU), ServedModel("b", "lcm", None, 20, CPU)]
    two_teachers = [ServedModel("t", "teacher", None, 1000, CPU), ServedModel("u", "teacher", None, 400, CPU)]
    for models, name, limit in [
        (two_students, "steps", 20),
        (two_teachers, "steps", 8),
        (two_teachers, "teacher_steps", 400),
        (two_students, "teacher_steps", 1000),
    ]:
        assert getattr(check_request(models, **{**GOOD, name: limit}), name) == limit
        with pytest.raises(
            RequestError, match=rf"^{name.replace('_', ' ')} {limit + 1}: give a whole number from 1 to {limit}$"
        ):
            check_request(models, **{**GOOD, name: limit + 1})


@register_reward("test-brightness")
class Brightness(RewardModel):
    benchmark_scale = 100.0

    def forward(self, images, prompts):
        return images.mean(dim=(1, 2, 3))


@pytest.fixture(scope="module")
def served(teacher_dirs, tmp_path_factory):
    """A full student, a LoRA run's export (random adapters, its config.yaml beside) and the teacher."""
    root = tmp_path_factory.mktemp("serve")
    teacher_dir = teacher_dirs["epsilon"]
    teacher = load_teacher(teacher_dir)
    student = export_pipeline(root / "student", build_student(teacher.unet), teacher)
    config = load_config("tiny", [f"model.teacher={teacher_dir}", "lora.rank=4", f"logging.output_dir={root}"])
    adapted = add_lora(load_teacher(teacher_dir).unet, rank=4)
    with torch.no_grad():  # non-zero adapters, so the LoRA student differs from its teacher
        generator = torch.Generator().manual_seed(0)
        for name, parameter in adapted.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    save_lora(adapted, root / "lora")
    (root / "config.yaml").write_text(config.to_yaml())
    return {"teacher": teacher_dir, "student": student, "lora": root / "lora", "adapted": adapted, "config": config}


def test_serves_full_and_lora_students_and_the_teacher_from_one_seed(served):
    settings = ServeSettings(
        [f"LCM={served['student']}", f"LoRA={served['lora']}", f"teacher={served['teacher']}"], reward="test-brightness"
    )
    models, reward = load_models(settings)
    assert [(m.label, m.kind) for m in models] == [("LCM", "lcm"), ("LoRA", "lcm"), ("teacher", "teacher")]
    request = check_request(models, **{**GOOD, "teacher_steps": 4})
    samples = generate(models, request, reward)
    assert [(s.label, s.steps) for s in samples] == [("LCM", 2), ("LoRA", 2), ("teacher", 4)]
    for sample in samples:
        pixels = np.asarray(sample.image, dtype=float)
        assert sample.image.size == (32, 32) and sample.seconds > 0
        assert sample.score == pytest.approx(100 * pixels.mean() / 255, abs=0.3)  # the reward, on its scale

    # Each image is what the sampler gives from torch.Generator().manual_seed(seed) (rglcd sample's first image).
    student = models[0].parts
    expected = lcm_sample(student.unet, student.vae, student, student.scheduler, [GOOD["prompt"]], num_steps=2,
                          guidance_scale=6.0, generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert np.array_equal(np.asarray(samples[0].image), np.asarray(to_pil(expected)[0]))
    # The LoRA export fused onto the teacher named in its run's config.yaml samples as the adapted UNet does.
    config, teacher = served["config"], load_teacher(served["teacher"])
    grid = lcm_scheduler(teacher.scheduler_config, config.distill.num_ddim_timesteps, config.distill.timestep_scaling)
    adapted = lcm_sample(served["adapted"], teacher.vae, teacher, grid, [GOOD["prompt"]], num_steps=2,
                         guidance_scale=6.0, generator=torch.Generator().manual_seed(3))  # fmt: skip
    difference = np.abs(np.asarray(samples[1].image, dtype=int) - np.asarray(to_pil(adapted)[0], dtype=int))
    assert difference.max() <= 1  # fusing reorders float sums: at most one uint8 step
    assert not np.array_equal(np.asarray(samples[1].image), np.asarray(samples[0].image))
    assert shown(samples[0].image).size == (256, 256)  # 32 pixels shown 8× larger, nearest-neighbour
    assert shown(Image.new("RGB", (512, 512))).size == (512, 512)


def test_bad_models_are_refused_before_serving(served, tmp_path):
    lonely = tmp_path / "adapters"
    shutil.copytree(served["lora"], lonely)  # LoRA weights with no run around them
    with pytest.raises(RequestError, match="no rglcd run around it"):
        load_served_model(str(lonely), CPU)
    with pytest.raises(RequestError, match="two models share a label"):
        load_models(ServeSettings([f"a={served['student']}", f"a={served['teacher']}"]))
    with pytest.raises(RequestError, match="two models share a label"):  # refused before any weights load
        load_models(ServeSettings([f"a={tmp_path / 'missing'}", f"a={tmp_path / 'missing too'}"]))
    for args, message in [
        (["--model", tmp_path / "missing"], str(tmp_path / "missing")),
        (["--model", served["student"], "--reward", "no-such-reward"], "--reward no-such-reward: choose from"),
        (["--quickstart", tmp_path / "none"], "no quickstart students in"),
    ]:
        result = run_main("serve", *args, "--port", "9", check=False)
        assert result.returncode == 2 and result.stderr.startswith("rglcd serve: "), result.stderr
        assert message in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def browser_missing() -> str | None:
    """Why the browser test cannot run here, or None."""
    for module in ("gradio", "selenium"):
        try:
            __import__(module)
        except ImportError:
            return f"{module} is not installed: pip install -e '.[test,serve]'"
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        return "no chromium/chromedriver: apt-get install chromium chromium-driver (.ci/run does)"
    return None


def reserved_port() -> int:
    """A port held for the server without a race: bound, connected to and closed from the accepting side, it stays in
    TIME_WAIT (60 s on Linux), so the kernel hands it to no other bind (port-0 binds, or explicit ones without
    SO_REUSEADDR), while uvicorn's listener, which sets SO_REUSEADDR (asyncio's create_server on POSIX), takes it.
    A plain probe (bind port 0, close, pass the number on) could be taken in between by another test process. Neither
    gradio nor uvicorn reports a port-0 bind (gradio checks its page at the port it was given, and `rglcd serve
    --port` refuses 0), so the port is chosen here; the server binds it as soon as its models are loaded (seconds)."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        with socket.create_connection(listener.getsockname()):
            accepted, _ = listener.accept()
            accepted.close()  # the side that closes first keeps the TIME_WAIT: the listener's port
        return listener.getsockname()[1]


def wait_for_page(url: str, server: subprocess.Popen, log, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            pytest.fail(f"rglcd serve exited with {server.returncode}:\n{log.read()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"rglcd serve did not answer at {url} within {timeout} s")


@pytest.fixture
def quickstart_folder(tiny_world_cache, tmp_path):
    """A quickstart's layout with untrained students of the (tiny) world teacher: what `rglcd serve` serves when
    given no model."""
    teacher = load_teacher(tiny_world_cache / "world" / "teacher")
    for name in ("lcm", "rg-lcm"):
        export_pipeline(tmp_path / "quickstart" / name / "student", build_student(teacher.unet), teacher)
    return tmp_path / "quickstart"


@pytest.mark.skipif(browser_missing() is not None, reason=browser_missing() or "")
def test_the_page_in_a_headless_browser(tiny_world_cache, quickstart_folder, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support import expected_conditions as visible
    from selenium.webdriver.support.ui import WebDriverWait

    port = reserved_port()
    env = {**os.environ, "RGLCD_CACHE": str(tiny_world_cache), "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "rglcd", "serve", "--quickstart", str(quickstart_folder), "--port", str(port)]
    with tempfile.TemporaryFile("w+") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True, env=env)
        try:
            wait_for_page(f"http://127.0.0.1:{port}/", server, log)
            options = webdriver.ChromeOptions()
            options.binary_location = shutil.which("chromium")
            for flag in (
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--window-size=1280,1000",
                f"--user-data-dir={tmp_path / 'profile'}",
            ):
                options.add_argument(flag)  # fmt: skip
            driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
            try:
                driver.get(f"http://127.0.0.1:{port}/")
                wait = WebDriverWait(driver, 120)
                prompt = wait.until(visible.element_to_be_clickable((By.CSS_SELECTOR, "#prompt textarea")))

                def message_shown(text):
                    return wait.until(visible.visibility_of_element_located((By.XPATH, f"//*[text()='{text}']")))

                driver.find_element(By.ID, "generate").click()  # an empty prompt: a message, not a crash
                message_shown("Type a prompt first.")
                prompt.send_keys("a large red circle on the left")
                steps = driver.find_element(By.CSS_SELECTOR, "#steps input")
                steps.clear()
                steps.send_keys("1000")  # absurd steps: the message names the range
                driver.find_element(By.ID, "generate").click()
                message_shown("steps 1000: give a whole number from 1 to 50")
                steps.clear()
                steps.send_keys("2")
                prompt.send_keys(Keys.ENTER)  # the other way to generate

                def images(page):
                    found = [
                        img for img in page.find_elements(By.CSS_SELECTOR, "#samples img") if img.get_attribute("src")
                    ]
                    return found if len(found) >= 3 else False

                assert len(wait.until(images)) == 3
                table = wait.until(lambda page: page.find_element(By.ID, "timings").text or False)
                for expected in ("world-clip", "teacher DDIM+CFG", "LCM", "RG-LCM", "time (ms)"):
                    assert expected in table, table
                driver.save_screenshot(str(tmp_path / "serve.png"))
            finally:
                driver.quit()
        finally:
            server.terminate()
            server.wait(timeout=30)
    shot = Image.open(tmp_path / "serve.png")
    assert shot.size[0] >= 1000 and np.asarray(shot.convert("L")).std() > 10  # a drawn page, not a blank one


def test_models_load_in_the_given_dtype_and_run_once_before_serving(served, monkeypatch):
    import rglcd.serve as module

    with pytest.raises(RequestError, match="--dtype fp8: not a sampling dtype"):  # refused before any weights load
        load_models(ServeSettings([f"LCM={served['student']}"], dtype="fp8"))
    runs, real = [], module.generate
    monkeypatch.setattr(
        module, "generate", lambda models, request, reward=None: runs.append(request) or real(models, request, reward)
    )
    models, _ = load_models(ServeSettings([f"LCM={served['student']}", f"teacher={served['teacher']}"], dtype="bf16"))
    assert runs == [WARM_UP]  # each model ran once: the first request's time is not the GPU's start-up
    assert [(model.parts.unet.dtype, model.parts.text_encoder.dtype) for model in models] == [(torch.bfloat16,) * 2] * 2
    for sample in real(models, check_request(models, **{**GOOD, "teacher_steps": 2})):
        assert sample.image.size == (32, 32) and np.asarray(sample.image).std() > 0  # a picture, not a NaN-black one


def test_the_clock_reads_the_time_with_the_device_queue_drained(served, monkeypatch):
    import rglcd.serve as module

    models, _ = load_models(ServeSettings([f"LCM={served['student']}"]))
    events = []
    monkeypatch.setattr(module, "synchronize", lambda device: events.append(f"sync {device}"))
    monkeypatch.setattr(module, "time", SimpleNamespace(perf_counter=lambda: events.append("clock") or 0.0))
    generate(models, check_request(models, **GOOD))
    assert events == ["sync cpu", "clock", "sync cpu", "clock"]
