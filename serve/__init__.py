"""Serving on NVIDIA Triton Inference Server: `wan-serve repo` writes a model repository from an
artifact directory, `wan-serve start` runs a Triton server over it, `wan-run --server` is the client.

    repository.py     the model repository: one Triton model per stage + the `wan` model
    stage_model.py    a stage as a Python-backend model (ONNX Runtime), batching requests itself
    wan_model.py      `wan`: the decoupled BLS model that runs a generation over the stage models
    protocol.py       what a request and its streamed responses hold (client and server)
    server.py         finding and running tritonserver (the bundled one from nvidia-pytriton)
    client.py         the gRPC streaming client behind `wan-run --server`
    cli.py            `wan-serve`

Like runtime/, this never imports torch; the models run the runtime's own code (runtime.job),
so a request is checked and generated exactly as `wan-run` does it locally.
"""
