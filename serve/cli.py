"""`wan-serve`: a Triton model repository from an artifact directory, and a server over it."""

from __future__ import annotations

import click

from runtime.errors import WanError, run_cli

EXAMPLES = """
\b
Examples:
  wan-serve repo artifacts/small --out repo/small                 # CPU: Python-backend stage models
  wan-serve start repo/small --python serve-env/bin/python        # foreground; Ctrl+C or SIGTERM stops it
  wan-run --server 127.0.0.1:8001 --image examples/reference.png -o out.mp4
\b
  wan-serve repo artifacts/ti2v --out repo/ti2v --precision fp16 --stage-backend tensorrt   # GPU node
"""


@click.group(epilog=EXAMPLES, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--debug", is_flag=True, help="Tracebacks and debug logging.")
def main(debug):
    """Serve wan-export artifacts with NVIDIA Triton Inference Server: one Triton model per stage
    (the DiT batched across concurrent videos) and a streaming `wan` model that runs the
    generation, as wan-run does locally."""


@main.command(epilog=EXAMPLES)
@click.argument("artifacts", type=click.Path(path_type=str))
@click.option("--out", "-o", required=True, type=click.Path(path_type=str), help="The repository folder to write.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Which built precision the stage models run.")
@click.option("--stage-backend", type=click.Choice(["python", "onnxruntime", "tensorrt"]), default="python",
              show_default=True, help="python: Triton's Python backend running ONNX Runtime (any Triton, "
              "including the bundled one; CUDA when onnxruntime-gpu is installed); onnxruntime: Triton's "
              "ONNX Runtime backend (NVIDIA's Triton container, GPU); tensorrt: the engines of wan-export "
              "--tensorrt.")
@click.option("--instances", type=int, default=1, show_default=True, help="Instances of each stage model.")
@click.option("--concurrency", type=int, default=4, show_default=True,
              help="Videos generated at once (instances of the wan model); more wait in Triton's queue.")
@click.option("--threads", type=int, help="ONNX Runtime threads per stage instance (default: the CPUs this "
              "process may use / --instances).")
@click.option("--spin", is_flag=True, help="Let ONNX Runtime's threads spin-wait between ops: faster on an "
              "otherwise idle machine, much slower when instances share cores (the default is off).")
@click.option("--max-batch", type=int, help="DiT calls joined across videos, counted in DiT batch rows (a "
              "video with CFG is 2; default: the largest batch the graphs were checked for).")
@click.option("--queue-delay-us", type=int, default=2000, show_default=True,
              help="How long the DiT's dynamic batcher waits for other videos' steps.")
@click.option("--force", is_flag=True, help="Replace an existing repository that wan-serve wrote.")
def repo(artifacts, out, precision, stage_backend, instances, concurrency, threads, spin, max_batch,
         queue_delay_us, force):
    """Write a Triton model repository for an artifact directory (verified in full first)."""
    from serve.repository import RepoSettings, write_repository

    settings = RepoSettings(precision, stage_backend, instances, concurrency, threads, spin, max_batch,
                            queue_delay_us)
    path = write_repository(artifacts, out, settings, force)
    click.echo(f"wrote {path}: start it with wan-serve start {path}")


@main.command(epilog=EXAMPLES)
@click.argument("repository", type=click.Path(path_type=str))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (0.0.0.0 for every interface, as in a container).")
@click.option("--grpc-port", type=int, default=8001, show_default=True, help="gRPC (wan-run --server; streaming).")
@click.option("--http-port", type=int, default=8000, show_default=True, help="HTTP/REST: health, ready, model "
              "status (the wan model streams, which needs gRPC).")
@click.option("--metrics-port", type=int, default=8002, show_default=True, help="Prometheus metrics (/metrics).")
@click.option("--python", "python", type=click.Path(path_type=str), help="The interpreter whose environment the "
              "Python models run in (default: this one). The bundled Triton's stub needs numpy<2 there.")
@click.option("--log-verbose", type=int, default=0, show_default=True, help="Triton's log verbosity.")
def start(repository, host, grpc_port, http_port, metrics_port, python, log_verbose):
    """Run Triton Inference Server over a repository in the foreground (the tritonserver on PATH,
    else the one nvidia-pytriton bundles); SIGTERM or Ctrl+C stops it cleanly."""
    from runtime.files import absolute
    from serve.repository import read_marker
    from serve.server import run_server, server_command

    path = absolute(repository)
    read_marker(path)
    ports = {"grpc port": grpc_port, "http port": http_port, "metrics port": metrics_port}
    for name, port in ports.items():
        if not 0 < port < 65536:
            raise WanError(f"{name} {port} is not allowed: use 1 to 65535")
    if len(set(ports.values())) < 3:
        raise WanError(f"the gRPC, HTTP and metrics ports must differ (got {grpc_port}, {http_port}, {metrics_port})")
    code = run_server(server_command(path, host, grpc_port, http_port, metrics_port, python,
                                     log_verbose=log_verbose))
    if code not in (0, -15):
        raise WanError(f"tritonserver exited with code {code} (its log above says why; a model that failed "
                       "to load is listed with its error)")


entry_point = run_cli(main, "wan-serve")
