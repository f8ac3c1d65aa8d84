"""Generate the bundled sample of lvwerra/stack-exchange-paired (seeded, reproducible).

The sample is laid out exactly like the Hub dataset repo:

    data/sample/stack-exchange-paired/data/{finetune,rl,evaluation}/train-0000N-of-0000M.parquet

with the Hub's columns and types: qid (int64), question, date, metadata (list of str),
response_j (the preferred answer), response_k (the other one). Like the real data, one
question yields one to three pairs, so a qid repeats within a split; qids never repeat
across splits, so the evaluation split is held out.

The preference is learnable and general, as in the real data: the preferred answer explains
the cause, shows corrected code or a concrete command and says why it works, while the
other one is low effort (dismissive, off-topic, a bare guess or a "me too"). Every slot is
filled at random from site-specific vocabularies, so held-out questions are new
combinations, not copies.

    python scripts/make_sample_data.py [--out DIR] [--seed 1234] [--rows finetune=1500 ...]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from stages.fetch import SCHEMA  # the Hub dataset's columns and types

DEFAULT_ROWS = {"finetune": 1500, "rl": 1500, "evaluation": 300}
ROWS_PER_SHARD = 1000

# Each site: the tools people ask about, the language of their snippets, and snippets
# (broken, fixed) with the cause and the fix in words.
SITES = {
    "stackoverflow.com": {
        "tools": ["Python", "pandas", "NumPy", "Django", "Flask", "asyncio", "the requests library"],
        "lang": "python",
        "cases": [
            ("for i in range(len(items)):\n    if items[i] == target:\n        items.remove(items[i])",
             "items = [item for item in items if item != target]",
             "the list shrinks while you iterate over its indices, so the loop skips elements and finally runs past the end",
             "build a new list instead of removing from the one you are looping over"),
            ("df['total'] = df['price'] * df['qty']\nprint(df.groupby('region').total.sum)",
             "df['total'] = df['price'] * df['qty']\nprint(df.groupby('region')['total'].sum())",
             "`sum` is a method, so without the parentheses you print the bound method instead of calling it",
             "call the aggregation and select the column with brackets"),
            ("def add_item(item, bucket=[]):\n    bucket.append(item)\n    return bucket",
             "def add_item(item, bucket=None):\n    if bucket is None:\n        bucket = []\n    bucket.append(item)\n    return bucket",
             "the default list is created once, when the function is defined, and then shared by every call",
             "use `None` as the default and create the list inside the function"),
            ("data = json.load(open('config.json'))\nvalue = data['settings']['timeout']",
             "with open('config.json', encoding='utf-8') as fh:\n    data = json.load(fh)\nvalue = data.get('settings', {}).get('timeout', 30)",
             "the key is missing in some config files and the file handle is never closed",
             "open the file in a `with` block and read optional keys with `.get` and a default"),
            ("result = asyncio.run(fetch_all(urls))\nfor r in result:\n    print(r.json())",
             "async def main():\n    results = await fetch_all(urls)\n    for r in results:\n        print(await r.json())\n\nasyncio.run(main())",
             "`r.json()` is a coroutine in aiohttp, so you print the coroutine object instead of awaiting it",
             "await the response body inside an async function"),
            ("arr = np.array([1, 2, 3])\nif arr > 1:\n    print('big')",
             "arr = np.array([1, 2, 3])\nif (arr > 1).any():\n    print('big')",
             "comparing an array gives an array of booleans, and its truth value is ambiguous",
             "say whether you mean any element or all elements with `.any()` or `.all()`"),
        ],
    },
    "unix.stackexchange.com": {
        "tools": ["bash", "find", "sed", "awk", "systemd", "rsync", "cron"],
        "lang": "bash",
        "cases": [
            ("for f in $(ls *.txt); do\n  mv $f backup/$f\ndone",
             "for f in ./*.txt; do\n  mv -- \"$f\" backup/\ndone",
             "parsing `ls` splits file names on spaces and the unquoted variable is split again",
             "let the shell expand the glob and always quote the variable"),
            ("sed 's/foo/bar/' file.txt > file.txt",
             "sed -i 's/foo/bar/g' file.txt",
             "the shell truncates `file.txt` for the redirection before `sed` ever reads it",
             "edit in place with `-i` (or write to a temporary file and move it)"),
            ("*/5 * * * * backup.sh",
             "*/5 * * * * /usr/local/bin/backup.sh >> /var/log/backup.log 2>&1",
             "cron runs with a minimal `PATH`, so it cannot find the script, and the error goes nowhere",
             "use the absolute path and redirect the output to a log"),
            ("find . -name *.log -exec rm {} ;",
             "find . -name '*.log' -type f -delete",
             "the unquoted pattern is expanded by the shell and the `;` is eaten by the shell too",
             "quote the pattern and let `find` delete the files itself"),
            ("if [ $count > 10 ]; then echo many; fi",
             "if [ \"$count\" -gt 10 ]; then echo many; fi",
             "inside `[ ]` the `>` is a redirection that creates a file called `10`",
             "use the numeric operator `-gt` and quote the variable"),
        ],
    },
    "superuser.com": {
        "tools": ["Windows 10", "Excel", "PowerShell", "VLC", "Chrome", "7-Zip"],
        "lang": "powershell",
        "cases": [
            ("Get-ChildItem C:\\logs | Remove-Item",
             "Get-ChildItem C:\\logs -Filter *.log -Recurse | Where-Object LastWriteTime -lt (Get-Date).AddDays(-30) | Remove-Item",
             "the pipeline removes every item, including folders and fresh logs",
             "filter by extension and age before removing"),
            ("=VLOOKUP(A2, Sheet2!A:B, 2)",
             "=VLOOKUP(A2, Sheet2!A:B, 2, FALSE)",
             "without the last argument `VLOOKUP` does an approximate match on unsorted data",
             "ask for an exact match with `FALSE` as the fourth argument"),
            ("Set-ExecutionPolicy Unrestricted",
             "Set-ExecutionPolicy -Scope CurrentUser RemoteSigned",
             "changing the machine policy needs an elevated prompt and lowers security for everyone",
             "set a policy for your own user only"),
            ("robocopy C:\\data D:\\backup",
             "robocopy C:\\data D:\\backup /E /Z /R:2 /W:5 /LOG:C:\\backup.log",
             "by default robocopy skips subfolders and retries a locked file a million times",
             "copy subfolders with `/E` and limit the retries"),
        ],
    },
    "serverfault.com": {
        "tools": ["nginx", "Apache", "PostgreSQL", "Docker", "iptables", "SSH"],
        "lang": "nginx",
        "cases": [
            ("location /api {\n    proxy_pass http://127.0.0.1:8000;\n}",
             "location /api/ {\n    proxy_pass http://127.0.0.1:8000/;\n    proxy_set_header Host $host;\n    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n}",
             "without the trailing slashes the `/api` prefix is passed to the backend, and the original host is lost",
             "add the trailing slashes and forward the headers the backend needs"),
            ("listen 443;\nssl_certificate /etc/ssl/cert.pem;",
             "listen 443 ssl;\nssl_certificate /etc/ssl/fullchain.pem;\nssl_certificate_key /etc/ssl/privkey.pem;",
             "the `ssl` flag is missing and the chain file does not include the intermediate certificate",
             "enable TLS on the listener and serve the full chain with its key"),
            ("client_max_body_size 1m;",
             "client_max_body_size 50m;",
             "uploads larger than one megabyte are rejected with 413 before they reach the application",
             "raise the limit in the server or location block and reload"),
            ("upstream app {\n    server app:8000;\n}",
             "upstream app {\n    server app:8000 max_fails=3 fail_timeout=10s;\n    keepalive 16;\n}",
             "one slow backend marks the whole upstream down and every request opens a new connection",
             "set failure limits and keep connections alive"),
        ],
    },
    "askubuntu.com": {
        "tools": ["apt", "Ubuntu 22.04", "GRUB", "snap", "ufw", "netplan"],
        "lang": "bash",
        "cases": [
            ("sudo apt install package\nE: Unable to locate package",
             "sudo apt update\nsudo apt install package",
             "the package lists are stale, so apt does not know the package exists",
             "refresh the lists with `apt update` first"),
            ("sudo ufw enable",
             "sudo ufw allow OpenSSH\nsudo ufw enable\nsudo ufw status verbose",
             "enabling the firewall before allowing SSH locks you out of a remote machine",
             "allow SSH first and then check the rules"),
            ("network:\n  ethernets:\n    eth0:\n    dhcp4: true",
             "network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true",
             "netplan files are YAML, and the wrong indentation puts `dhcp4` outside the interface",
             "indent the keys under the interface and run `sudo netplan apply`"),
            ("sudo update-grub\nerror: no such partition",
             "sudo grub-install /dev/sda\nsudo update-grub",
             "the boot loader still points at a partition that was deleted",
             "reinstall GRUB on the disk and regenerate its configuration"),
        ],
    },
    "math.stackexchange.com": {
        "tools": ["induction", "limits", "integration by parts", "eigenvalues", "modular arithmetic"],
        "lang": "latex",
        "cases": [
            ("\\lim_{x \\to 0} \\frac{\\sin x}{x} = \\frac{0}{0} = 0",
             "\\lim_{x \\to 0} \\frac{\\sin x}{x} = \\lim_{x \\to 0} \\frac{\\cos x}{1} = 1",
             "$\\frac{0}{0}$ is an indeterminate form, not zero",
             "apply L'Hopital's rule (or the squeeze theorem) to resolve the indeterminate form"),
            ("\\int x e^x \\, dx = \\frac{x^2}{2} e^x + C",
             "\\int x e^x \\, dx = x e^x - \\int e^x \\, dx = (x - 1) e^x + C",
             "you cannot integrate a product factor by factor",
             "integrate by parts with $u = x$ and $dv = e^x dx$"),
            ("2^{n+1} = 2 \\cdot 2^n \\geq 2n",
             "2^{n+1} = 2 \\cdot 2^n \\geq 2(n + 1) \\geq n + 2",
             "the inductive step never uses the hypothesis for the right value of $n$",
             "use the hypothesis $2^n \\geq n + 1$ and compare with $n + 2$"),
            ("\\det(A - \\lambda I) = \\lambda^2 - 4",
             "\\det(A - \\lambda I) = \\lambda^2 - 5\\lambda + 4 = (\\lambda - 1)(\\lambda - 4)",
             "the trace term of the characteristic polynomial was dropped",
             "expand the determinant fully and factor it"),
        ],
    },
}

GOALS = [
    "get this working", "understand why this fails", "fix this error", "make this faster",
    "clean up this code", "automate this task", "make this reliable", "migrate this setup",
]
CONTEXTS = [
    "This is for a small internal tool at work.", "I inherited this from a colleague.",
    "It worked last week and now it doesn't.", "I'm new to {tool}, so sorry if this is obvious.",
    "This runs on a production server.", "It only happens on one machine.",
    "I followed a tutorial but my case is a bit different.", "The docs were not clear to me.",
]
SYMPTOMS = [
    "it fails without any useful message", "the output is not what I expect",
    "it works for small inputs but not for large ones", "it throws an error every time",
    "it silently does nothing", "it behaves differently every run",
]
ATTEMPTS = [
    "reading the documentation", "searching for similar questions", "adding print statements",
    "reinstalling everything", "running it as root", "asking a colleague",
]
OPENINGS = [
    "The problem is that", "What happens here is that", "This is a common pitfall:",
    "The root cause is that", "Good question. The issue is that",
]
CLOSINGS = [
    "After this change {tool} behaves as expected.", "I tested this on a clean setup and it works.",
    "This way the original problem cannot come back.", "That should fix it; let me know if it doesn't.",
]
REFERENCES = [
    "See the official {tool} documentation for the details.",
    "The {tool} manual has a section on exactly this.",
    "You can read more about this in the {tool} reference.",
    "",
]
# Low-effort answers, the kind that get fewer votes.
BAD_ANSWERS = [
    "Why would you want to do that? Just use something else.",
    "Google it, this has been asked a hundred times.",
    "I have the same problem. Did you ever solve it?",
    "{tool} can't do that.",
    "Try restarting your computer.",
    "Works for me.",
    "Read the manual.",
    "Just reinstall {tool}, that usually fixes everything.",
    "No idea, maybe ask on the mailing list?",
    "Possible duplicate, closing.",
    "I think it's a bug in {tool}. Report it.",
    "Use a different tool, {tool} is terrible for this.",
    "Maybe try `{short}`? Not sure though.",
    "lol, just don't do that",
    "You should learn the basics of {tool} first.",
]


def _question(rng: random.Random, tool: str, lang: str, broken: str) -> str:
    title_goal = rng.choice(GOALS)
    context = rng.choice(CONTEXTS).format(tool=tool)
    symptom = rng.choice(SYMPTOMS)
    attempt = rng.choice(ATTEMPTS)
    return (
        f"I'm trying to {title_goal} with {tool}. {context}\n\n"
        f"```{lang}\n{broken}\n```\n\n"
        f"The problem is that {symptom}. I've already tried {attempt}, but no luck.\n\n"
        f"What am I doing wrong?"
    )


def _good_answer(rng: random.Random, tool: str, lang: str, fixed: str, cause: str, fix_why: str) -> str:
    opening = rng.choice(OPENINGS)
    closing = rng.choice(CLOSINGS).format(tool=tool)
    reference = rng.choice(REFERENCES).format(tool=tool)
    parts = [f"{opening} {cause}.", f"Instead, {fix_why}:", f"```{lang}\n{fixed}\n```", closing]
    if reference:
        parts.append(reference)
    return "\n\n".join(parts)


def _bad_answer(rng: random.Random, tool: str, fixed: str) -> str:
    short = fixed.splitlines()[0][:40]
    return rng.choice(BAD_ANSWERS).format(tool=tool, short=short)


def generate_split(rng: random.Random, n_rows: int, qids: set[int]) -> list[dict]:
    """n_rows pairs; each question gives 1-3 pairs, like the real data."""
    rows: list[dict] = []
    while len(rows) < n_rows:
        site = rng.choice(sorted(SITES))
        spec = SITES[site]
        tool = rng.choice(spec["tools"])
        broken, fixed, cause, fix_why = rng.choice(spec["cases"])
        qid = rng.randrange(10_000, 80_000_000)
        while qid in qids:
            qid = rng.randrange(10_000, 80_000_000)
        qids.add(qid)
        question = _question(rng, tool, spec["lang"], broken)
        date = f"{rng.randint(2009, 2023)}/{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}"
        users = [f"https://{site}/users/{rng.randrange(1, 9_000_000)}/" for _ in range(2)]
        metadata = [f"https://{site}/questions/{qid}", f"https://{site}", *users]
        for _ in range(min(rng.randint(1, 3), n_rows - len(rows))):
            rows.append(
                {
                    "qid": qid,
                    "question": question,
                    "date": date,
                    "metadata": metadata,
                    "response_j": _good_answer(rng, tool, spec["lang"], fixed, cause, fix_why),
                    "response_k": _bad_answer(rng, tool, fixed),
                }
            )
    return rows


def write_split(rows: list[dict], split_dir: Path) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    for old in split_dir.glob("*.parquet"):
        old.unlink()
    n_shards = max(1, -(-len(rows) // ROWS_PER_SHARD))
    for i in range(n_shards):
        chunk = rows[i * ROWS_PER_SHARD : (i + 1) * ROWS_PER_SHARD]
        table = pa.Table.from_pylist(chunk, schema=SCHEMA)
        pq.write_table(table, split_dir / f"train-{i:05d}-of-{n_shards:05d}.parquet")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/sample/stack-exchange-paired")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--rows", nargs="*", default=[], help="split=N, e.g. rl=2000")
    args = parser.parse_args()
    counts = dict(DEFAULT_ROWS)
    for item in args.rows:
        split, n = item.split("=")
        counts[split] = int(n)
    rng = random.Random(args.seed)
    seen_qids: set[int] = set()  # shared, so qids never repeat across splits
    for split, n in counts.items():
        write_split(generate_split(rng, n, seen_qids), Path(args.out) / "data" / split)
        print(f"{split}: {n} rows")


if __name__ == "__main__":
    main()
