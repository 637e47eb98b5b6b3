"""A second Ray driver calls the application through ``serve.get_app_handle``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import ray

DRIVER = textwrap.dedent(
    """
    import json
    import time
    import ray
    from ray import serve
    from serve_app.api.errors import ApiError
    from serve_app.api.openai import ChatCompletionRequest, CompletionRequest

    ray.init(address="auto", namespace="serve")
    handle = serve.get_app_handle("llm")
    request = CompletionRequest(model="demo", prompt="The if statement", max_tokens=8,
                                temperature=0)
    unary = handle.generate.remote(request).result()
    chunks = list(handle.options(stream=True).stream.remote(request))
    chat = handle.chat.remote(ChatCompletionRequest(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        temperature=0)).result()
    try:
        handle.generate.remote(CompletionRequest.model_construct(
            model="demo", prompt="x", max_tokens=-1)).result()
        bad = None
    except ApiError as error:
        bad = {"status": error.status, "param": error.param}
    long = CompletionRequest(model="demo", prompt="The", max_tokens=500, ignore_eos=True,
                             temperature=0.5)
    stream = handle.options(stream=True).stream.remote(long)
    next(stream)
    model = serve.get_deployment_handle("LLMModel", app_name="llm")
    running_before_cancel = model.stats.remote().result()["num_running"]
    stream.cancel()
    deadline = time.monotonic() + 15
    while model.stats.remote().result()["num_running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    print(json.dumps({
        "running_before_cancel": running_before_cancel,
        "running_after_cancel": model.stats.remote().result()["num_running"],
        "unary": unary.choices[0].text,
        "unary_type": type(unary).__name__,
        "streamed": "".join(c.choices[0].text for c in chunks if c.choices),
        "chat": chat.choices[0].message.content,
        "bad": bad,
    }))
    """
)


def test_second_driver_calls_typed_methods_and_cancels(served_app: str) -> None:
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    result = subprocess.run(
        [sys.executable, "-c", DRIVER], capture_output=True, text=True, timeout=180, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["unary_type"] == "CompletionResponse"
    assert out["unary"]
    assert out["streamed"] == out["unary"]
    assert out["chat"] is not None
    assert out["bad"] == {"status": 400, "param": "max_tokens"}
    assert out["running_before_cancel"] == 1
    assert out["running_after_cancel"] == 0
