"""Phase-2 edit of modelscape/hparams.py: PRECISION (job) and COMPILE (sweep)."""
import sys
p = sys.argv[1]
s = open(p).read()
def rep(old, new):
    global s
    assert s.count(old) == 1, old[:70]
    s = s.replace(old, new)
rep('''DTYPES = ("float32", "float64")''', '''DTYPES = ("float32", "float64")
PRECISIONS = ("fp32", "tf32", "bf16-mixed")
COMPILE_MODES = ("auto", "off")''')
rep('''    DTYPE: str = hp("float32", "Floating dtype of models and data.", choices=DTYPES)''', '''    DTYPE: str = hp("float32", "Floating dtype of models and data.", choices=DTYPES)
    PRECISION: str = hp(
        "fp32",
        "Matmuls: fp32, tf32 (TF32 on CUDA) or bf16-mixed (autocast bf16, fp32 weights).",
        choices=PRECISIONS,
    )''')
i = s.index('    BATCHED: str = hp(')
j = s.index('    )\n', i) + len('    )\n')
s = s[:j] + '''    COMPILE: str = hp(
        "auto",
        "Stacked step as a CUDA graph on GPUs (auto) or always eager (off).",
        scope="sweep",
        choices=COMPILE_MODES,
    )
''' + s[j:]
rep('''    if h.GAMMA <= 0:''', '''    if h.PRECISION != "fp32" and h.DTYPE != "float32":
        raise HParamError(
            f"PRECISION={h.PRECISION!r} changes how float32 matmuls compute; with "
            f"DTYPE={h.DTYPE!r} it would do nothing. Set DTYPE='float32' or PRECISION='fp32'."
        )
    if h.GAMMA <= 0:''')
open(p, 'w').write(s)
