"""Generate the bundled sample of lvwerra/stack-exchange-paired (seeded, reproducible).

The sample is laid out exactly like the Hub dataset repo:

    data/sample/stack-exchange-paired/data/{finetune,rl,evaluation}/train-0000N-of-0000M.parquet

with the Hub's columns and types: qid (int64), question, date, metadata (list of str),
response_j (the preferred answer), response_k (the other one). Like the real data, one
question yields one to three pairs, so a qid repeats within a split; qids never repeat
across splits, so the evaluation split is held out.

The preference needs learning: both answers of a pair are full answers written from the same
template (an explanation of the cause, the fix in words, usually a code block, optional
remarks), so neither length nor a code block tells them apart. The preferred answer names the
real cause and a fix that works; the other one is wrong (a plausible but false cause and a
fix that does not work) or answers another question. The problems are split in two: the
finetune split (SFT) asks about problems that the rl and evaluation splits never use, so the
SFT model has no preference of its own on the preference problems; rl teaches them and the
evaluation split asks new questions about them, in answer texts that occur in no training
split.

    python scripts/make_sample_data.py [--out DIR] [--seed 1234] [--rows finetune=1500 ...]
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from stack_dpo.dataset import RAW_SCHEMA as SCHEMA  # the Hub dataset's columns and types

DEFAULT_ROWS = {"finetune": 1500, "rl": 1500, "evaluation": 300}
ROWS_PER_SHARD = 1000
ANOTHER_QUESTION_RATE = 0.2  # share of rejected answers that answer another question (the rest are wrong)
CODE_RATE = 0.85             # share of answers, preferred or not, with a code block


class Answer(NamedTuple):
    code: str   # the snippet the answer proposes
    cause: str  # what it says is wrong
    how: str    # the fix in words


class Case(NamedTuple):
    """One problem: the snippet a question shows, the answer that is right, and the plausible
    answers that are wrong (only the preference problems, which rl and evaluation use, have them)."""

    broken: str
    right: Answer
    wrong: tuple[Answer, ...] = ()


# Each site: the tools people ask about, the language of their snippets, and its problems.
SITES = {
    'stackoverflow.com': {
        "tools": ['Python', 'pandas', 'NumPy', 'Django', 'Flask', 'asyncio', 'the requests library'],
        "lang": 'python',
        "cases": [
            Case(
                'for i in range(len(items)):\n    if items[i] == target:\n        items.remove(items[i])',
                Answer('items = [item for item in items if item != target]',
                       'the list shrinks while you iterate over its indices, so the loop skips elements and finally runs past the end',
                       'build a new list instead of removing from the one you are looping over'),
                wrong=(
                    Answer('for i in range(len(items)):\n    if items[i] == target:\n        del items[i]',
                           '`remove` searches the list again by value, so with duplicates it deletes a different element than the one at `i`',
                           'delete by index with `del`, so exactly the element you found is removed'),
                    Answer('for i in range(len(items)):\n    if items[i] is target:\n        items.remove(items[i])',
                           '`==` compares the values with `__eq__`, which is unreliable for the objects in your list',
                           'compare with `is`, so only the target itself matches'),
                ),
            ),
            Case(
                "df['total'] = df['price'] * df['qty']\nprint(df.groupby('region').total.sum)",
                Answer("df['total'] = df['price'] * df['qty']\nprint(df.groupby('region')['total'].sum())",
                       '`sum` is a method, so without the parentheses you print the bound method instead of calling it',
                       'call the aggregation and select the column with brackets'),
            ),
            Case(
                'def add_item(item, bucket=[]):\n    bucket.append(item)\n    return bucket',
                Answer('def add_item(item, bucket=None):\n    if bucket is None:\n        bucket = []\n    bucket.append(item)\n    return bucket',
                       'the default list is created once, when the function is defined, and then shared by every call',
                       'use `None` as the default and create the list inside the function'),
                wrong=(
                    Answer('def add_item(item, bucket=[]):\n    bucket.append(item)\n    result = list(bucket)\n    return result',
                           '`append` changes the list in place, so the caller gets a reference to the same object back',
                           'return a copy of the list, so every call gets its own result'),
                    Answer('def add_item(item, items=[]):\n    items.append(item)\n    return items\n\nresult = add_item(1)',
                           'the parameter name `bucket` shadows a module-level name, so Python appends to that global list',
                           'rename the parameter, so the function only sees its own list'),
                ),
            ),
            Case(
                "data = json.load(open('config.json'))\nvalue = data['settings']['timeout']",
                Answer("with open('config.json', encoding='utf-8') as fh:\n    data = json.load(fh)\nvalue = data.get('settings', {}).get('timeout', 30)",
                       'the key is missing in some config files and the file handle is never closed',
                       'open the file in a `with` block and read optional keys with `.get` and a default'),
            ),
            Case(
                'result = asyncio.run(fetch_all(urls))\nfor r in result:\n    print(r.json())',
                Answer('async def main():\n    results = await fetch_all(urls)\n    for r in results:\n        print(await r.json())\n\nasyncio.run(main())',
                       '`r.json()` is a coroutine in aiohttp, so you print the coroutine object instead of awaiting it',
                       'await the response body inside an async function'),
            ),
            Case(
                "arr = np.array([1, 2, 3])\nif arr > 1:\n    print('big')",
                Answer("arr = np.array([1, 2, 3])\nif (arr > 1).any():\n    print('big')",
                       'comparing an array gives an array of booleans, and its truth value is ambiguous',
                       'say whether you mean any element or all elements with `.any()` or `.all()`'),
                wrong=(
                    Answer("arr = np.array([1, 2, 3])\nif arr > np.array(1):\n    print('big')",
                           'NumPy cannot compare an array with a plain Python integer, so the comparison itself fails',
                           'wrap the number in an array, so both sides of the comparison are arrays'),
                    Answer("arr = np.array([1, 2, 3])\nif arr.tolist() > 1:\n    print('big')",
                           'an `if` statement needs a Python list, and NumPy arrays do not support the comparison there',
                           'convert the array with `.tolist()` before you compare it'),
                ),
            ),
        ],
    },
    'unix.stackexchange.com': {
        "tools": ['bash', 'find', 'sed', 'awk', 'systemd', 'rsync', 'cron'],
        "lang": 'bash',
        "cases": [
            Case(
                'for f in $(ls *.txt); do\n  mv $f backup/$f\ndone',
                Answer('for f in ./*.txt; do\n  mv -- "$f" backup/\ndone',
                       'parsing `ls` splits file names on spaces and the unquoted variable is split again',
                       'let the shell expand the glob and always quote the variable'),
                wrong=(
                    Answer('for f in $(ls *.txt); do\n  mv -f $f backup/$f\ndone',
                           '`mv` refuses to move several files from one loop unless it is forced, and then it stops',
                           'add `-f` to `mv`, so each file is moved without a question'),
                    Answer('for f in $(ls *.txt); do\n  mv ${f} backup/${f}\ndone',
                           'without braces bash reads `$f` as an empty variable inside the loop',
                           'write the variable as `${f}`, so bash knows where the name ends'),
                ),
            ),
            Case(
                "sed 's/foo/bar/' file.txt > file.txt",
                Answer("sed -i 's/foo/bar/g' file.txt",
                       'the shell truncates `file.txt` for the redirection before `sed` ever reads it',
                       'edit in place with `-i` (or write to a temporary file and move it)'),
                wrong=(
                    Answer("sed 's/foo/bar/g' file.txt > file.txt",
                           '`sed` replaces only the first match on each line, so most of the file looks unchanged',
                           'add the `g` flag, so every match on a line is replaced'),
                    Answer("sed 's/foo/bar/' file.txt >| file.txt",
                           '`>` appends to an existing file in most shells, so the old text stays at the top',
                           'use `>|` to force the shell to overwrite the file'),
                ),
            ),
            Case(
                '*/5 * * * * backup.sh',
                Answer('*/5 * * * * /usr/local/bin/backup.sh >> /var/log/backup.log 2>&1',
                       'cron runs with a minimal `PATH`, so it cannot find the script, and the error goes nowhere',
                       'use the absolute path and redirect the output to a log'),
                wrong=(
                    Answer('0,5,10,15,20,25,30,35,40,45,50,55 * * * * backup.sh',
                           'the step syntax `*/5` is a GNU extension that most cron daemons reject without a message',
                           'list the minutes explicitly, which every cron daemon accepts'),
                    Answer('chmod +x backup.cron\n*/5 * * * * backup.cron',
                           'cron only runs files with the `.cron` extension from a user crontab',
                           'rename the script to `backup.cron` and make it executable'),
                ),
            ),
            Case(
                'find . -name *.log -exec rm {} ;',
                Answer("find . -name '*.log' -type f -delete",
                       'the unquoted pattern is expanded by the shell and the `;` is eaten by the shell too',
                       'quote the pattern and let `find` delete the files itself'),
            ),
            Case(
                'if [ $count > 10 ]; then echo many; fi',
                Answer('if [ "$count" -gt 10 ]; then echo many; fi',
                       'inside `[ ]` the `>` is a redirection that creates a file called `10`',
                       'use the numeric operator `-gt` and quote the variable'),
            ),
        ],
    },
    'superuser.com': {
        "tools": ['Windows 10', 'Excel', 'PowerShell', 'VLC', 'Chrome', '7-Zip'],
        "lang": 'powershell',
        "cases": [
            Case(
                'Get-ChildItem C:\\logs | Remove-Item',
                Answer('Get-ChildItem C:\\logs -Filter *.log -Recurse | Where-Object LastWriteTime -lt (Get-Date).AddDays(-30) | Remove-Item',
                       'the pipeline removes every item, including folders and fresh logs',
                       'filter by extension and age before removing'),
            ),
            Case(
                '=VLOOKUP(A2, Sheet2!A:B, 2)',
                Answer('=VLOOKUP(A2, Sheet2!A:B, 2, FALSE)',
                       'without the last argument `VLOOKUP` does an approximate match on unsorted data',
                       'ask for an exact match with `FALSE` as the fourth argument'),
                wrong=(
                    Answer('=VLOOKUP(A2, Sheet2!A:B, 1)',
                           'the column index of `VLOOKUP` counts from zero, so `2` points one column too far',
                           'use `1` for the second column of the range'),
                    Answer('=VLOOKUP(A2, Sheet2!A1:B100, 2)',
                           '`VLOOKUP` does not accept whole-column references like `A:B` and reads them as empty',
                           'give the range with fixed row numbers'),
                ),
            ),
            Case(
                'Set-ExecutionPolicy Unrestricted',
                Answer('Set-ExecutionPolicy -Scope CurrentUser RemoteSigned',
                       'changing the machine policy needs an elevated prompt and lowers security for everyone',
                       'set a policy for your own user only'),
            ),
            Case(
                'robocopy C:\\data D:\\backup',
                Answer('robocopy C:\\data D:\\backup /E /Z /R:2 /W:5 /LOG:C:\\backup.log',
                       'by default robocopy skips subfolders and retries a locked file a million times',
                       'copy subfolders with `/E` and limit the retries'),
                wrong=(
                    Answer('robocopy C:\\data D:\\backup /MIR /PURGE',
                           'robocopy only copies files that are newer than the target, and the backup already has older copies',
                           'mirror the folders, so every file is copied again'),
                    Answer('xcopy C:\\data D:\\backup /Y /C /H',
                           'robocopy is deprecated on Windows 10 and no longer copies folders reliably',
                           'use `xcopy`, which is the supported tool for this'),
                ),
            ),
        ],
    },
    'serverfault.com': {
        "tools": ['nginx', 'Apache', 'PostgreSQL', 'Docker', 'iptables', 'SSH'],
        "lang": 'nginx',
        "cases": [
            Case(
                'location /api {\n    proxy_pass http://127.0.0.1:8000;\n}',
                Answer('location /api/ {\n    proxy_pass http://127.0.0.1:8000/;\n    proxy_set_header Host $host;\n    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n}',
                       'without the trailing slashes the `/api` prefix is passed to the backend, and the original host is lost',
                       'add the trailing slashes and forward the headers the backend needs'),
                wrong=(
                    Answer('location /api {\n    proxy_pass http://localhost:8000;\n    proxy_read_timeout 300s;\n    proxy_connect_timeout 75s;\n}',
                           'nginx cannot proxy to an IP address like `127.0.0.1`, only to a host name it resolves itself, and the requests time out',
                           'use `localhost` as the upstream host'),
                    Answer('location /api {\n    return 301 http://127.0.0.1:8000$request_uri;\n}\nlocation = /api {\n    return 301 /api/;\n}',
                           '`proxy_pass` is not allowed inside a `location` block, so nginx ignores it',
                           'redirect the clients to the backend instead'),
                ),
            ),
            Case(
                'listen 443;\nssl_certificate /etc/ssl/cert.pem;',
                Answer('listen 443 ssl;\nssl_certificate /etc/ssl/fullchain.pem;\nssl_certificate_key /etc/ssl/privkey.pem;',
                       'the `ssl` flag is missing and the chain file does not include the intermediate certificate',
                       'enable TLS on the listener and serve the full chain with its key'),
                wrong=(
                    Answer('listen 443 default_server;\nserver_name _;\nssl_certificate /etc/ssl/cert.pem;',
                           'port 443 is reserved, and nginx only binds to it on the default server',
                           'mark the listener as `default_server`'),
                    Answer('listen 443;\nssl_certificate /etc/ssl/cert.der;\nssl_protocols TLSv1.2;',
                           'nginx only reads certificates in DER format and silently skips PEM files, so the handshake fails',
                           'convert the certificate to DER and point nginx at the new file'),
                ),
            ),
            Case(
                'client_max_body_size 1m;',
                Answer('client_max_body_size 50m;',
                       'uploads larger than one megabyte are rejected with 413 before they reach the application',
                       'raise the limit in the server or location block and reload'),
            ),
            Case(
                'upstream app {\n    server app:8000;\n}',
                Answer('upstream app {\n    server app:8000 max_fails=3 fail_timeout=10s;\n    keepalive 16;\n}',
                       'one slow backend marks the whole upstream down and every request opens a new connection',
                       'set failure limits and keep connections alive'),
            ),
        ],
    },
    'askubuntu.com': {
        "tools": ['apt', 'Ubuntu 22.04', 'GRUB', 'snap', 'ufw', 'netplan'],
        "lang": 'bash',
        "cases": [
            Case(
                'sudo apt install package\nE: Unable to locate package',
                Answer('sudo apt update\nsudo apt install package',
                       'the package lists are stale, so apt does not know the package exists',
                       'refresh the lists with `apt update` first'),
                wrong=(
                    Answer('sudo apt install package=latest',
                           'apt cannot pick a version by itself, so it needs the version number with the package name',
                           'ask for the version explicitly after an equals sign'),
                    Answer('sudo dpkg --install package\nsudo dpkg --configure -a',
                           '`apt` only installs desktop packages and cannot find server packages',
                           'install the package with `dpkg` directly'),
                ),
            ),
            Case(
                'sudo ufw enable',
                Answer('sudo ufw allow OpenSSH\nsudo ufw enable\nsudo ufw status verbose',
                       'enabling the firewall before allowing SSH locks you out of a remote machine',
                       'allow SSH first and then check the rules'),
                wrong=(
                    Answer('sudo service ufw start\nsudo ufw enable',
                           'the ufw service has to be running before the firewall can be enabled safely',
                           'start the service first and then enable it'),
                    Answer("sudo sed -i 's/IPV6=yes/IPV6=no/' /etc/default/ufw\nsudo ufw enable",
                           'with IPv6 turned on ufw blocks every connection, including the ones you allowed',
                           'turn IPv6 off in the ufw defaults and then enable it'),
                ),
            ),
            Case(
                'network:\n  ethernets:\n    eth0:\n    dhcp4: true',
                Answer('network:\n  version: 2\n  ethernets:\n    eth0:\n      dhcp4: true',
                       'netplan files are YAML, and the wrong indentation puts `dhcp4` outside the interface',
                       'indent the keys under the interface and run `sudo netplan apply`'),
            ),
            Case(
                'sudo update-grub\nerror: no such partition',
                Answer('sudo grub-install /dev/sda\nsudo update-grub',
                       'the boot loader still points at a partition that was deleted',
                       'reinstall GRUB on the disk and regenerate its configuration'),
            ),
        ],
    },
    'math.stackexchange.com': {
        "tools": ['induction', 'limits', 'integration by parts', 'eigenvalues', 'modular arithmetic'],
        "lang": 'latex',
        "cases": [
            Case(
                '\\lim_{x \\to 0} \\frac{\\sin x}{x} = \\frac{0}{0} = 0',
                Answer('\\lim_{x \\to 0} \\frac{\\sin x}{x} = \\lim_{x \\to 0} \\frac{\\cos x}{1} = 1',
                       '$\\frac{0}{0}$ is an indeterminate form, not zero',
                       "apply L'Hopital's rule (or the squeeze theorem) to resolve the indeterminate form"),
                wrong=(
                    Answer('\\lim_{x \\to 0} \\frac{\\sin x}{x} = \\lim_{x \\to 0} \\frac{1}{x} = \\infty',
                           '$\\sin x$ tends to $1$ near zero, so the fraction grows like $\\frac{1}{x}$',
                           'replace $\\sin x$ by its value near zero and compare the growth of both parts'),
                    Answer('\\lim_{x \\to 0^-} \\frac{\\sin x}{x} = -1, \\quad \\lim_{x \\to 0^+} \\frac{\\sin x}{x} = 1',
                           'the one-sided limits differ in sign, so the limit does not exist',
                           'compute both one-sided limits separately and compare them'),
                ),
            ),
            Case(
                '\\int x e^x \\, dx = \\frac{x^2}{2} e^x + C',
                Answer('\\int x e^x \\, dx = x e^x - \\int e^x \\, dx = (x - 1) e^x + C',
                       'you cannot integrate a product factor by factor',
                       'integrate by parts with $u = x$ and $dv = e^x dx$'),
                wrong=(
                    Answer('\\int x e^x \\, dx = x e^x + C',
                           'the exponential has to be integrated first, and $x$ stays as it is',
                           'treat $x$ as a constant factor while you integrate $e^x$'),
                    Answer('\\int x e^x \\, dx = e^x + x e^x + C',
                           'the product rule can be reversed directly on $x e^x$',
                           'read the antiderivative off the product rule'),
                ),
            ),
            Case(
                '2^{n+1} = 2 \\cdot 2^n \\geq 2n',
                Answer('2^{n+1} = 2 \\cdot 2^n \\geq 2(n + 1) \\geq n + 2',
                       'the inductive step never uses the hypothesis for the right value of $n$',
                       'use the hypothesis $2^n \\geq n + 1$ and compare with $n + 2$'),
            ),
            Case(
                '\\det(A - \\lambda I) = \\lambda^2 - 4',
                Answer('\\det(A - \\lambda I) = \\lambda^2 - 5\\lambda + 4 = (\\lambda - 1)(\\lambda - 4)',
                       'the trace term of the characteristic polynomial was dropped',
                       'expand the determinant fully and factor it'),
            ),
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
    "The root cause is that", "Good question. The issue is that", "In short,",
    "I had the same thing happen, and the reason is that", "Look closely at the snippet:",
]
CLOSINGS = [
    "After this change {tool} behaves as expected.", "I tested this on a clean setup and it works.",
    "This way the original problem cannot come back.", "That should fix it; let me know if it doesn't.",
    "Hope this helps.", "With that, the snippet does what you meant.",
    "Run it again and the symptom should be gone.", "That is all there is to it.",
]
REFERENCES = [
    "See the official {tool} documentation for the details.",
    "The {tool} manual has a section on exactly this.",
    "You can read more about this in the {tool} reference.",
    "There is a longer discussion of this in the {tool} issue tracker.",
    "", "",
]
REMARKS = [  # optional, in preferred and other answers alike
    "I ran into exactly this last year.", "Make sure to try it on a copy first.",
    "This is easy to miss when you read the code quickly.", "The error message does not help much here.",
    "Your question is clear, by the way.", "It is worth adding a test for this case.",
    "Other answers here suggest workarounds, but this is the actual fix.",
    "I checked this with a recent version of {tool}.", "Edit: added the code after a comment.",
    "The same applies to older versions.",
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


def _answer(rng: random.Random, tool: str, lang: str, answer: Answer) -> str:
    """One answer in the shared template, whatever its quality: the same openings, code-block
    rate, remarks and closings for a preferred and an other answer, so only substance differs."""
    parts = [f"{rng.choice(OPENINGS)} {answer.cause}."]
    if rng.random() < CODE_RATE:
        parts += [f"Instead, {answer.how}:", f"```{lang}\n{answer.code}\n```"]
    else:
        parts.append(f"Instead, {answer.how}.")
    parts += [remark.format(tool=tool) for remark in rng.sample(REMARKS, rng.randint(0, 2))]
    parts.append(rng.choice(CLOSINGS).format(tool=tool))
    reference = rng.choice(REFERENCES).format(tool=tool)
    return "\n\n".join([*parts, reference] if reference else parts)


def _other_answer(rng: random.Random, case: Case, others: list[Case], preference: bool) -> Answer:
    """Wrong for this question: a plausible but false answer, or the right answer of another one."""
    if preference and rng.random() >= ANOTHER_QUESTION_RATE:
        return rng.choice(case.wrong)
    return rng.choice([other for other in others if other is not case]).right


def generate_split(rng: random.Random, n_rows: int, qids: set[int], preference: bool,
                   taken: set[str] | None = None) -> list[dict]:
    """n_rows pairs; each question gives 1-3 pairs, like the real data. `preference` picks the
    problems with wrong answers (rl, evaluation) or the others (finetune). An answer text in
    `taken` (the training splits' answers) is drawn again, so held-out answers are new."""
    rows: list[dict] = []
    while len(rows) < n_rows:
        site = rng.choice(sorted(SITES))
        spec = SITES[site]
        cases = [case for case in spec["cases"] if bool(case.wrong) == preference]
        case = rng.choice(cases)
        tool = rng.choice(spec["tools"])
        qid = rng.randrange(10_000, 80_000_000)
        while qid in qids:
            qid = rng.randrange(10_000, 80_000_000)
        qids.add(qid)
        question = _question(rng, tool, spec["lang"], case.broken)
        date = f"{rng.randint(2009, 2023)}/{rng.randint(1, 12):02d}/{rng.randint(1, 28):02d}"
        users = [f"https://{site}/users/{rng.randrange(1, 9_000_000)}/" for _ in range(2)]
        metadata = [f"https://{site}/questions/{qid}", f"https://{site}", *users]
        for _ in range(min(rng.randint(1, 3), n_rows - len(rows))):
            texts = []
            for answer in (case.right, _other_answer(rng, case, cases, preference)):
                text = _answer(rng, tool, spec["lang"], answer)
                while taken is not None and text in taken:
                    text = _answer(rng, tool, spec["lang"], answer)
                texts.append(text)
            rows.append({"qid": qid, "question": question, "date": date, "metadata": metadata,
                         "response_j": texts[0], "response_k": texts[1]})
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
    training_answers: set[str] = set()
    for split in ("finetune", "rl", "evaluation"):  # evaluation last: its answers avoid the others'
        held_out = split == "evaluation"
        rows = generate_split(rng, counts[split], seen_qids, preference=split != "finetune",
                              taken=training_answers if held_out else None)
        if not held_out:
            training_answers.update(text for row in rows for text in (row["response_j"], row["response_k"]))
        write_split(rows, Path(args.out) / "data" / split)
        print(f"{split}: {counts[split]} rows")


if __name__ == "__main__":
    main()
