"""``ucp``: inspect, verify and demonstrate checkpoints.

Every failure a user can cause ends in one line on stderr (``ucp: error: ...``) and a non-zero exit
code, never a traceback. Heavy imports (torch) happen inside the commands, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import os
import sys

from ucp import __version__
from ucp.errors import UcpError
from ucp.trainer.options import add_arguments

EPILOG = """\
CKPT is a checkpoint directory (ROOT/step_00000100) or a ROOT holding several; a ROOT means its
newest complete checkpoint. inspect and verify also take a universal checkpoint (made by convert).
Exit codes: 0 ok, 1 error, 2 not found / bad usage, 3 corrupted.
"""


#: characters that would break a message over lines or rewrite the terminal: C0, DEL, C1, and Unicode's
#: line and paragraph separators
_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0))}
_CONTROL.update({0x09: "\\t", 0x0A: "\\n", 0x0D: "\\r", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def one_line(text: str) -> str:
    """``text`` with every control character escaped (``\\n``, ``\\x1b``, ...): what the CLI prints of an
    error stays one line whatever a path or a value holds."""
    return str(text).translate(_CONTROL)


def fail(message: str, code: int = 1) -> int:
    """Print ``ucp: error: <message>`` as one line on stderr; return ``code``."""
    print(f"ucp: error: {one_line(message)}", file=sys.stderr)
    return code


class _Parser(argparse.ArgumentParser):
    """argparse, with a usage error said in one line (``ucp: error: COMMAND: what (see ucp COMMAND
    --help)``) and exit code 2, like every other error of the CLI; its subcommands' parsers are of
    this class too."""

    def error(self, message: str):
        sys.stderr.flush()
        command = self.prog.removeprefix("ucp").strip()
        fail(f"{command + ': ' if command else ''}{message} (see {self.prog} --help)")
        sys.exit(2)


def _checkpoint_command(sub, name: str, help: str, description: str) -> argparse.ArgumentParser:
    """A command on one checkpoint: ``CKPT`` (a checkpoint directory, or a root and ``--step``)."""
    p = sub.add_parser(name, help=help, description=description, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", metavar="CKPT", help="checkpoint directory or root")
    p.add_argument("--step", type=int, help="with a ROOT: this step instead of the newest")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="ucp",
        description="Fault-tolerant checkpointing for distributed PyTorch training.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"ucp {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = _checkpoint_command(sub, "inspect", "show what a checkpoint holds",
                            "Show a checkpoint's step, layout, files and every tensor with its shape, dtype, pattern "
                            "and fragments. Reads only the manifest.")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON (fragments included)")

    p = _checkpoint_command(sub, "verify", "check completeness and every fragment's checksum",
                            "Read every byte of a checkpoint and check it against the manifest: files present with "
                            "the recorded sizes, each fragment's CRC-32C. Exits 3 naming each bad fragment (file and "
                            "tensor key).")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("convert", help="turn a distributed checkpoint into a universal one", epilog=EPILOG,
                       description="Consolidate a distributed checkpoint into a universal checkpoint: a zarr v3 "
                                   "group with one array per tensor key (padding stripped, fused parts in their "
                                   "logical order, crc32c per chunk), independent of the layout that saved it. "
                                   "Streams tensor by tensor with bounded memory; DST appears only when complete.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", metavar="SRC", help="distributed checkpoint directory or root (with --from hf: a Hugging "
                                              "Face model directory or .safetensors file)")
    p.add_argument("--from", dest="source", choices=("ucp", "hf", "dcp", "deepspeed"), default="ucp",
                   help="the format of SRC: ucp (default), hf (Hugging Face safetensors weights, with or without "
                        "model.safetensors.index.json), dcp (a torch.distributed.checkpoint directory) or deepspeed "
                        "(a DeepSpeed ZeRO-1/2/3 save, Megatron-style TP/PP included, or its folder with 'latest'); "
                        "docs/foreign.md")
    p.add_argument("dst", metavar="DST", help="universal checkpoint directory to create (must not exist), or an "
                                              "fsspec URL (s3://..., memory://...) where the header is written last")
    p.add_argument("--spec", metavar="SPEC", help="UCL spec (a FILE.ucl, or a packaged one: megatron-gpt, "
                                                  "megatron-llama) completing the recorded geometry (fused parts, "
                                                  "padding), saying how a tensor-parallel DeepSpeed save split each "
                                                  "parameter (required there), and giving export names; docs/ucl.md")
    p.add_argument("--set", metavar="NAME=N", action="append",
                   help="a model setting the spec's rules name (vocab, padded_vocab, q_size, kv_size, ffn ...), over "
                        "what the spec and the checkpoint say; repeatable")
    p.add_argument("--step", type=int, help="with a ROOT: this step instead of the newest")
    p.add_argument("--workers", type=int, default=4, help="tensors converted at once, default 4")
    p.add_argument("--compress", choices=("none", "zstd"), default="none", help="chunk compression, default none")
    p.add_argument("--chunk-kib", type=int, default=1024, help="inner chunk size in KiB, default 1024")
    p.add_argument("--memory-mib", type=int, default=None,
                   help="buffer memory in MiB (default: twice the largest tensor)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("export", help="write a universal checkpoint's weights as Hugging Face safetensors",
                       description="Write the model weights of a universal checkpoint (made by convert) as Hugging "
                                   "Face-style safetensors: OUT/model.safetensors, or model-0000i-of-0000n.safetensors "
                                   "shards with model.safetensors.index.json above --max-shard-size. Names and fused "
                                   "splits follow the UCL spec's export rules (rename, split); config.json and "
                                   "generation_config.json are written beside them when the source had them or "
                                   "--config names them.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("universal", metavar="UNIVERSAL", help="universal checkpoint directory")
    p.add_argument("out", metavar="OUT", help="directory to create (must not exist)")
    p.add_argument("--spec", metavar="FILE.ucl", help="UCL spec with export rules (default: the one convert used)")
    p.add_argument("--optimizer", action="store_true",
                   help="also write the optimizer states (optimizer*.safetensors, names <weight>/<state>)")
    p.add_argument("--max-shard-size", default="5GB", help="split files above this size, e.g. 500MB, 2GiB; default 5GB")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="cast floating-point tensors")
    p.add_argument("--config", metavar="PATH", action="append",
                   help="a model directory (its config.json, generation_config.json) or one of those files, "
                        "written beside the weights (default: those convert --from hf kept); repeatable. Its "
                        "model_type chooses Hugging Face names for MoE experts (docs/foreign.md section 1a)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    p.add_argument("--quiet", action="store_true", help="no progress bar")

    p = sub.add_parser("train", help="train the reference GPT on N local processes",
                       description="Train the reference GPT (ucp.trainer) on N local processes started by torch's "
                                   "elastic launcher (gloo). Prints one JSON line per step on stdout: "
                                   '{"step": .., "loss": ..}; logs go to stderr. On several machines run the same '
                                   "module under torchrun: torchrun --nproc-per-node N -m ucp.trainer.train ...")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) to run, default 2")
    add_arguments(p)

    p = sub.add_parser("agent", help="start, inspect or stop the snapshot agent of a job on this node",
                       description="The snapshot agent is one long-lived process per node and job that owns the "
                                   "shared memory holding that node's in-memory snapshots; trainers start it "
                                   "themselves, or a launcher starts it ahead of time. It runs detached, in a "
                                   "session of its own, and survives the trainers. See docs/agent.md.",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    agent = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    a = agent.add_parser("start", help="start the job's agent (or report the one running)")
    a.add_argument("--job", required=True, help="job name (torchrun: the --rdzv-id / TORCHELASTIC_RUN_ID)")
    a.add_argument("--foreground", action="store_true", help="run in this terminal until Ctrl-C")
    a.add_argument("--log", metavar="FILE", help="append the detached agent's output to FILE")
    a = agent.add_parser("status", help="show what the agent holds (every job's agent without --job)")
    a.add_argument("--job", help="job name")
    a.add_argument("--json", action="store_true", help="print JSON")
    a = agent.add_parser("stop", help="stop the job's agent and remove its memory (or a dead agent's leftovers)")
    a.add_argument("--job", required=True, help="job name")

    p = sub.add_parser("demo", help="a short multi-process save/load demonstration",
                       description="Train the reference GPT on N local processes (gloo, torch's elastic "
                                   "launcher; FSDP2, with tensor parallelism from 4 ranks), checkpoint it every few "
                                   "steps keeping the newest two, then start a new job from the newest checkpoint "
                                   "before the last step and check that its losses equal the uninterrupted run's, "
                                   "bit for bit.")
    p.add_argument("--nproc", type=int, default=2, help="processes (ranks) to run, default 2")
    p.add_argument("--steps", type=int, default=12, help="training steps, default 12")
    p.add_argument("--save-every", type=int, default=4, help="save every N steps, default 4")
    p.add_argument("--dir", default="ucp_demo", help="checkpoint root, default ./ucp_demo")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        from ucp.cli import commands  # (pyarrow and zarr: not imported for --help or a usage error)

        return getattr(commands, args.command)(args)
    except UcpError as e:
        return fail(str(e), e.exit_code)
    except BrokenPipeError:
        # The reader went away (``ucp inspect ... | head``): not an error of ours.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except OSError as e:
        where = f"{e.filename}: " if e.filename is not None else ""
        return fail(f"{where}{e.strerror or e}")
    except KeyboardInterrupt:
        print("ucp: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a bug: still one line (UCP_TRACEBACK=1 shows where it came from)
        if os.environ.get("UCP_TRACEBACK"):
            raise
        return fail(f"internal error, please report it: {type(e).__name__}: {' '.join(str(e).split())[:300]} "
                    "(UCP_TRACEBACK=1 shows the traceback)")


if __name__ == "__main__":
    sys.exit(main())
