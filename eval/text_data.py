"""The text data of owt_masked.py (docs/owt.md, "Data"): the exact GPT-2 BPE from the rank file
in assets/; the documents (local .txt / .json(l) / .parquet files, the Hugging Face hub, or the
two offline corpora: CPython's bundled docs "pydoc" and the standard library's docstrings
"stdlib"); their GPT-2 ids, cached once as memory maps; and the Corpus of blocks of D model ids
that the script trains on, samples prefixes from and decodes with.
"""
import glob
import os
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOKENIZER = "assets/gpt2.tiktoken"  # the GPT-2 BPE ranks (relative to the repository)
GPT2_PAT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
EOT = 50256                        # <|endoftext|>, joins documents
N_GPT2 = 50257
UNK_WARN = 0.05                    # warn when more validation tokens than this are unknown
BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


def gpt2_encoding(path: str = TOKENIZER):
    """The exact GPT-2 encoding from a local rank file (relative: to the repository)."""
    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    path = os.path.join(ROOT, path)
    if not os.path.isfile(path):
        raise SystemExit(f"error: the GPT-2 rank file {path!r} is not found")
    return tiktoken.Encoding("gpt2", pat_str=GPT2_PAT, mergeable_ranks=load_tiktoken_bpe(path),
                             special_tokens={"<|endoftext|>": EOT})


def data_files(cfg) -> list:
    """The files that --data_files (comma-separated globs) matches, sorted, each once."""
    return sorted({f for pat in cfg.data_files.split(",") if pat.strip()
                   for f in glob.glob(os.path.expanduser(pat.strip()))})


def data_needs(cfg) -> list:
    """[(problem, fix)] for a run's preflight: --data_files matches files, none of them empty."""
    files, needs = data_files(cfg), []
    if cfg.data_files and not files:
        needs.append((f"--data_files {cfg.data_files!r} matched no file", "fix the pattern"))
    empty = [f for f in files if os.path.isfile(f) and os.path.getsize(f) == 0]
    if empty:
        needs.append((f"--data_files file {empty[0]!r} is empty", "remove it or fix the pattern"))
    return needs


def load_documents(cfg):
    """A `datasets.Dataset` with a "text" column: local files, the offline corpora or the HF hub
    (Skylion007/openwebtext is a loading script, which datasets >= 4 refuses: docs/owt.md has
    the one-off export to parquet shards in document order, for --data_files)."""
    import datasets
    if cfg.data_files:
        files = data_files(cfg)
        if not files:
            raise SystemExit(f"error: --data_files {cfg.data_files!r} matched no file")
        kinds = {BUILDERS.get(os.path.splitext(f)[1].lower()) for f in files}
        if None in kinds or len(kinds) != 1:
            raise SystemExit(f"error: --data_files must all be one of {sorted(BUILDERS)}")
        kind = kinds.pop()
        try:
            ds = datasets.load_dataset(kind, data_files=files, split="train",
                                       **{"sample_by": "document"} if kind == "text" else {})
        except Exception as e:
            raise SystemExit(f"error: could not read --data_files {cfg.data_files!r} as {kind} "
                             f"({type(e).__name__}: {str(e).strip()[-200:]})") from None
    elif cfg.dataset == "pydoc":
        import pydoc_data.topics
        topics = pydoc_data.topics.topics
        ds = datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})
    elif cfg.dataset == "stdlib":
        ds = datasets.Dataset.from_dict({"text": stdlib_docstrings()})
    else:
        try:
            ds = datasets.load_dataset(cfg.dataset, split="train")
        except Exception as e:
            raise SystemExit(f"error: could not load dataset {cfg.dataset!r} ({type(e).__name__}: "
                             f"{str(e).strip()[:200]}); export it once as parquet shards (docs/"
                             "owt.md, OpenWebText) and pass --data_files 'owt/*.parquet'") from None
    if "text" not in ds.column_names:
        raise SystemExit(f"error: the corpus has no 'text' column (columns: {ds.column_names})")
    if len(ds) <= cfg.val_docs:
        raise SystemExit(f"error: the corpus has {len(ds)} documents, need more than "
                         f"--val_docs {cfg.val_docs}")
    return ds


def stdlib_docstrings() -> list:
    """The second offline corpus: per module of this Python's standard library (top level and
    one package level down; no tests, idlelib, lib2to3 or site-packages; sorted by path), its
    docstring and those of its classes and functions (ast.walk order), joined by blank lines."""
    import ast
    import sysconfig
    root = sysconfig.get_paths()["stdlib"]
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "lib2to3"}
    docs = []
    for f in sorted(glob.glob(os.path.join(root, "*.py")) + glob.glob(f"{root}/*/*.py")):
        if set(os.path.relpath(f, root).split(os.sep)[:-1]) & skip:
            continue
        try:
            tree = ast.parse(open(f, encoding="utf-8").read())
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
            n, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))]
        text = "\n\n".join(d for d in map(ast.get_docstring, nodes) if d)
        if text:
            docs.append(text)
    return docs


def token_cache(cfg, ctx, enc) -> dict:
    """{split: np.memmap uint16} of GPT-2 ids, tokenised once into text_tokens/ beside out_dir
    (shared by the runs there); documents [0, n - val_docs) are the training split, the last
    val_docs the validation split, each followed by <|endoftext|>. Rank 0 writes; the others wait for the files."""
    cache = os.path.join(os.path.dirname(os.path.abspath(cfg.out_dir)), "text_tokens")
    src = cfg.data_files or cfg.dataset
    tag = "".join(c if c.isalnum() else "_" for c in src)[-60:] + f"_v{cfg.val_docs}"
    paths = {s: os.path.join(cache, f"{tag}_{s}.bin") for s in ("train", "val")}
    if ctx.rank == 0 and not all(os.path.exists(p) for p in paths.values()):
        os.makedirs(cache, exist_ok=True)
        ds = load_documents(cfg)
        n = len(ds)
        for split, (lo, hi) in (("train", (0, n - cfg.val_docs)), ("val", (n - cfg.val_docs, n))):
            tmp = paths[split] + f".tmp{os.getpid()}"
            with open(tmp, "wb") as f:
                for i in range(lo, hi, 4096):
                    docs = enc.encode_ordinary_batch(ds[i:min(i + 4096, hi)]["text"])
                    f.write(np.fromiter((t for d in docs for t in d + [EOT]), np.uint16).tobytes())
            os.replace(tmp, paths[split])
        ctx.log(f"tokenised {n} documents from {src!r} into {cache}")
    while not all(os.path.exists(p) for p in paths.values()):   # other ranks: no collective,
        time.sleep(5)                                            # so no timeout while rank 0 works
    return {s: np.memmap(p, dtype=np.uint16, mode="r") for s, p in paths.items()}



class Corpus:
    """Blocks of D model ids, with GPT-2 encode / decode. remap_vocab: model ids are the GPT-2
    ids seen in the training split (sorted), then UNK, then [MASK] (a 50258-wide head is ~25x
    slower on CPU); otherwise model ids are GPT-2 ids and [MASK] = 50257. S counts [MASK]."""

    def __init__(self, cfg, ctx):
        self.enc, self.D, self.device = gpt2_encoding(), cfg.seq_len, ctx.device
        ids = token_cache(cfg, ctx, self.enc)
        self.to_gpt2, self.unk, self.to_local, self.S = None, None, None, N_GPT2 + 1
        if cfg.remap_vocab:
            self.to_gpt2 = np.unique(ids["train"]).astype(np.int64)         # (V,)
            self.unk, self.S = len(self.to_gpt2), len(self.to_gpt2) + 2
            self.to_local = np.full(N_GPT2, self.unk, dtype=np.int64)
            self.to_local[self.to_gpt2] = np.arange(self.unk)
            unknown = 1 - np.isin(ids["val"][:10 ** 7], self.to_gpt2).mean()  # first 10M tokens
            ctx.log(f"{'warning' if unknown > UNK_WARN else 'data'}: {100 * unknown:.1f}% unknown "
                    "validation tokens (UNK: not in the training text's vocabulary)")
        self.mask_id, self.blocks = self.S - 1, {}
        for split, arr in ids.items():
            n = len(arr) // self.D
            if n == 0:
                raise SystemExit(f"error: the {split} split has {len(arr)} tokens, fewer than "
                                 f"one block of --seq_len {self.D}")
            self.blocks[split] = arr[:n * self.D].reshape(n, self.D)          # (n, D) memmap
        ctx.log(f"data: {self.n_blocks('train')} train / {self.n_blocks('val')} val blocks "
                f"of {self.D} tokens, S = {self.S} (with [MASK])")

    def n_blocks(self, split: str) -> int:
        return self.blocks[split].shape[0]

    def get(self, split: str, idx) -> torch.Tensor:
        """Blocks idx of a split as model ids: (len(idx), D) long on the device."""
        x = self.blocks[split][np.sort(np.asarray(idx))].astype(np.int64)
        x = x if self.to_local is None else self.to_local[x]
        return torch.from_numpy(x).to(self.device)

    def batch(self, B: int, g: torch.Generator) -> torch.Tensor:
        idx = torch.randint(self.n_blocks("train"), (B,), generator=g, device=g.device)
        return self.get("train", idx.cpu().numpy())                           # (B, D)

    def gpt2_ids(self, x: torch.Tensor) -> torch.Tensor:
        """Model ids -> GPT-2 ids (UNK -> <|endoftext|>) for GPT-2 Large scoring."""
        table = None if self.to_gpt2 is None else torch.from_numpy(np.append(self.to_gpt2, EOT))
        return x if table is None else table[x.cpu().clamp_max(self.unk)]

    def decode(self, row) -> str:
        out, run = [], []
        for i in row:
            if self.to_gpt2 is not None and i >= self.unk:
                out.append(self.enc.decode(run) + ("<unk>" if i == self.unk else "<mask>"))
                run = []
            else:
                run.append(int(self.to_gpt2[i]) if self.to_gpt2 is not None else int(i))
        return "".join(out) + self.enc.decode([i for i in run if i < N_GPT2])
