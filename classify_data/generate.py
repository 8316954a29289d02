"""Generate the shipped code-defect classification set in ``classify_data/``.

Usage::

    python classify_data/generate.py            # rewrite the files next to this script
    python classify_data/generate.py --out DIR  # write them somewhere else

Standard library only, fully seeded: rerunning reproduces byte-identical files.

Every row is one function, in Python or C, with ``label`` 1 when it contains a real defect
and 0 when it does the same job correctly. Five defect families, each written several
ways (templates) in each language:

* ``sql_injection``: a query built by string concatenation / formatting vs a
  parameterised query;
* ``path_traversal``: a file path joined from user input without containment vs with a
  normalise-and-check (or an explicit rejection of ``..``/absolute paths);
* ``bounds_check``: an index or length from the caller used without (or with a half)
  bounds check vs a full one;
* ``hardcoded_credentials``: a password / API key / token literal vs one read from the
  environment or a secrets store;
* ``unchecked_return``: a NULL / None / error return used without a check vs checked.

A clean (label 0) function is the same template with the safe variant, so the label is
decided by the defect line, not by the template. Identifiers, tables, paths, messages and
the amount of unrelated surrounding code (logging, validation, loops, comments) vary per
row; the number of filler blocks is Pareto-distributed, so lengths have a long tail (most
functions are 10-40 lines, a few are hundreds). The held-out files use templates that the
train files never use (``template`` column), and fresh seeds.

Files: ``defects_{train,test}.jsonl`` (balanced) and ``defects_imbalanced_{train,test}.jsonl``
(about 10% defective). Columns: ``id``, ``text``, ``label``, ``language``, ``category``,
``template``.
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
SEED = 20260112

COUNTS = {  # name: (rows, fraction defective, split)
    "defects_train": (2000, 0.5, "train"),
    "defects_test": (400, 0.5, "test"),
    "defects_imbalanced_train": (2000, 0.1, "train"),
    "defects_imbalanced_test": (400, 0.1, "test"),
}

# --------------------------------------------------------------------------- vocabulary

NOUNS = (
    "user account order invoice customer product session report ticket payment shipment "
    "device sensor record entry profile document message comment tenant project job task "
    "asset upload backup template policy audit event metric"
).split()
VERBS = "get load fetch find read lookup resolve query open load_all select collect".split()
ACTIONS = "update delete save store remove archive export import sync refresh".split()
COLUMNS = "id name email owner status created_at region sku title slug token_hash".split()
DIRS = (
    "/var/lib/app/uploads",
    "/srv/data/files",
    "/opt/service/reports",
    "./storage",
    "/data/exports",
    "/home/app/public",
    "/var/www/static",
    "/tmp/cache/docs",
)
SECRETS = (
    "hunter2",
    "P@ssw0rd!",
    "admin123",
    "changeme",
    "S3cr3t-2024",
    "letmein!",
    "Winter2023#",
    "qwerty!9",
    "db_pass_01",
    "root:toor",
)
KEY_PREFIXES = ("sk_live_", "AKIA", "ghp_", "xoxb-", "api_", "tok_", "pk_prod_")
COMMENTS = (
    "keep this in sync with the schema",
    "TODO: move to a service object",
    "see ticket #{n}",
    "legacy path, do not remove",
    "retry budget is small on purpose",
    "callers expect a list",
    "fast path for the common case",
    "note: values are already trimmed",
    "the order matters here",
    "measured: this is not the bottleneck",
    "FIXME: handle timezone",
    "compat with v{n} clients",
)
HOSTS = ("db.internal", "10.0.0.{n}", "postgres.prod", "mysql-primary", "localhost", "warehouse.corp")


def snake(rng: random.Random, parts: int = 2) -> str:
    return "_".join(rng.choice(NOUNS + VERBS) for _ in range(parts))


def camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(p.title() for p in rest)


class Ids:
    """Identifiers for one function, in the style (snake/camel) the row draws."""

    def __init__(self, rng: random.Random, lang: str):
        self.rng = rng
        self.style_camel = lang == "c" and rng.random() < 0.35
        noun = rng.choice(NOUNS)
        self.noun = noun
        self.table = rng.choice([noun + "s", noun, "tbl_" + noun, noun + "_records"])
        self.col = rng.choice(COLUMNS)
        self.col2 = rng.choice([c for c in COLUMNS if c != self.col])
        self.dir = rng.choice(DIRS)
        self.n = rng.randint(2, 99)

    def name(self, base: str) -> str:
        return camel(base) if self.style_camel else base

    def var(self, *choices: str) -> str:
        return self.name(self.rng.choice(choices))


# --------------------------------------------------------------------------- filler


def py_filler(rng: random.Random, params: list[str], k: int) -> list[str]:
    v = rng.choice(["count", "total", "seen", "acc", "n_items", "budget", "hits", "misses"]) + str(k)
    n, m = rng.randint(2, 50), rng.randint(2, 9)
    p = rng.choice(params) if params else "value"
    options = [
        [f"# {rng.choice(COMMENTS).format(n=n)}"],
        [f'log.debug("step {k}: %r", {p})'],
        [f"{v} = 0", f"for i in range({n}):", f"    if i % {m} == 0:", f"        {v} += i"],
        [f"{v} = [x * {m} for x in range({n}) if x % {m}]"],
        [f"if {p} is None:", f'    raise ValueError("{p} is required")'],
        [f"started_{k} = time.monotonic()"],
        [
            f"{v} = {{}}",
            f"for key in ({rng.choice(COLUMNS)!r}, {rng.choice(COLUMNS)!r}):",
            f"    {v}[key] = {v}.get(key, 0) + 1",
        ],
        [f"if len(str({p})) > {n * 10}:", f'    log.warning("long {p}: %d chars", len(str({p})))'],
        [
            f"retries = {m}",
            "while retries > 0:",
            "    retries -= 1",
            f"    if retries < {m // 2 + 1}:",
            "        break",
        ],
        [f'"""{rng.choice(COMMENTS).format(n=n).capitalize()}."""']
        if k == 0
        else ["pass  # nothing to do yet"],
        [f"{v} = sorted(set(range({n})), reverse={rng.choice(['True', 'False'])})[:{m}]"],
        ["try:", f"    {v} = int(str({p}).strip() or 0)", "except ValueError:", f"    {v} = -1"],
    ]
    return rng.choice(options)


def c_filler(rng: random.Random, params: list[str], k: int) -> list[str]:
    v = rng.choice(["count", "total", "acc", "nread", "budget", "hits", "flags", "spins"]) + str(k)
    n, m = rng.randint(2, 64), rng.randint(2, 9)
    options = [
        [f"/* {rng.choice(COMMENTS).format(n=n)} */"],
        [f'log_debug("%s: step {k}", __func__);'],
        [
            f"long {v} = 0;",
            f"for (int i = 0; i < {n}; ++i) {{",
            f"    if (i % {m} == 0) {{",
            f"        {v} += i;",
            "    }",
            "}",
        ],
        [f"unsigned {v} = {n}u;", f"{v} ^= ({v} << {m % 5 + 1});"],
        [
            f"int {v} = {m};",
            f"while ({v}-- > 0) {{",
            f"    if ({v} == {m // 2}) {{",
            "        break;",
            "    }",
            "}",
        ],
        [f"const int {v} = {n} * {m};", f"(void){v};"],
        [f"static int {v} = 0;", f"{v}++;"],
        [f"if (verbose > {m % 3}) {{", f'    fprintf(stderr, "{k}: %d\\n", {n});', "}"],
        [f"double {v} = {n}.0 / {m}.0;", f"if ({v} > {n // 2}.0) {{", f"    {v} = {n // 2}.0;", "}"],
    ]
    return rng.choice(options)


def fill_count(rng: random.Random) -> int:
    """Filler blocks around the core: Pareto-tailed (most functions short, a few very long)."""
    return min(int(rng.paretovariate(1.3)) - 1 + rng.randint(0, 2), 60)


# --------------------------------------------------------------------------- templates
# A template returns (signature params, pre lines, core lines, post lines, return line, imports).

Template = Callable[[random.Random, Ids, bool], dict]


def py_sql_concat(rng, ids, bad):
    arg = ids.var(ids.col, "key", "needle", "term")
    q = f"SELECT {ids.col2}, {ids.col} FROM {ids.table} WHERE {ids.col} = "
    core = (
        [f'sql = "{q}\'" + {arg} + "\'"', "cursor.execute(sql)"]
        if bad
        else [f'sql = "{q}?"', f"cursor.execute(sql, ({arg},))"]
    )
    return dict(
        params=["conn", arg],
        pre=["cursor = conn.cursor()"],
        core=core,
        post=["rows = cursor.fetchall()"],
        ret="return rows",
    )


def py_sql_fstring(rng, ids, bad):
    arg = ids.var("name", "email", "owner", "slug")
    lim = rng.randint(5, 500)
    if bad:
        core = [
            f"query = f\"DELETE FROM {ids.table} WHERE {ids.col} = '{{{arg}}}' AND {ids.col2} < {lim}\"",
            "db.execute(query)",
        ]
    else:
        core = [
            f'query = "DELETE FROM {ids.table} WHERE {ids.col} = %s AND {ids.col2} < %s"',
            f"db.execute(query, ({arg}, {lim}))",
        ]
    return dict(params=["db", arg], pre=[], core=core, post=["db.commit()"], ret="return True")


def py_sql_percent(rng, ids, bad):
    arg = ids.var("order_by", "region", "status", "tenant")
    if bad:
        core = [
            f"stmt = \"UPDATE {ids.table} SET {ids.col2} = now() WHERE {ids.col} = '%s'\" % {arg}",
            "session.execute(text(stmt))",
        ]
    else:
        core = [
            f'stmt = text("UPDATE {ids.table} SET {ids.col2} = now() WHERE {ids.col} = :v")',
            f"session.execute(stmt, {{'v': {arg}}})",
        ]
    return dict(params=["session", arg], pre=[], core=core, post=[], ret="return session")


def py_sql_join(rng, ids, bad):
    arg = ids.var("ids", "keys", "names")
    if bad:
        core = [
            f'in_list = ", ".join("\'%s\'" % x for x in {arg})',
            f'cur.execute("SELECT * FROM {ids.table} WHERE {ids.col} IN (" + in_list + ")")',
        ]
    else:
        core = [
            f'marks = ", ".join("?" for _ in {arg})',
            f'cur.execute("SELECT * FROM {ids.table} WHERE {ids.col} IN (" + marks + ")", tuple({arg}))',
        ]
    return dict(
        params=["cur", arg],
        pre=[f"if not {arg}:", "    return []"],
        core=core,
        post=[],
        ret="return cur.fetchall()",
    )


def py_path_join(rng, ids, bad):
    arg = ids.var("filename", "name", "relpath", "doc")
    base = ids.var("BASE_DIR", "UPLOAD_ROOT", "ROOT")
    pre = [f'{base} = "{ids.dir}"']
    if bad:
        core = [f"path = os.path.join({base}, {arg})"]
    else:
        core = [
            f"path = os.path.realpath(os.path.join({base}, {arg}))",
            f"if os.path.commonpath([path, os.path.realpath({base})]) != os.path.realpath({base}):",
            f'    raise PermissionError("outside of {ids.dir}")',
        ]
    return dict(
        params=[arg],
        pre=pre,
        core=core,
        post=['with open(path, "rb") as fh:', "    data = fh.read()"],
        ret="return data",
    )


def py_path_send(rng, ids, bad):
    arg = ids.var("filename", "asset", "file_id")
    if bad:
        core = [f'target = "{ids.dir}/" + request.args["{arg}"]']
    else:
        core = [
            f'name = os.path.basename(request.args["{arg}"])',
            'if not name or name.startswith("."):',
            "    abort(400)",
            f'target = os.path.join("{ids.dir}", name)',
        ]
    return dict(
        params=[],
        pre=[],
        core=core,
        post=["if not os.path.exists(target):", "    abort(404)"],
        ret="return send_file(target)",
    )


def py_path_pathlib(rng, ids, bad):
    arg = ids.var("rel", "subpath", "key")
    if bad:
        core = [f'dest = Path("{ids.dir}") / {arg}']
    else:
        core = [
            f'root = Path("{ids.dir}").resolve()',
            f"dest = (root / {arg}).resolve()",
            "if not dest.is_relative_to(root):",
            f'    raise ValueError(f"bad path: {{{arg}}}")',
        ]
    return dict(
        params=[arg, "payload"],
        pre=[],
        core=core,
        post=["dest.parent.mkdir(parents=True, exist_ok=True)", "dest.write_bytes(payload)"],
        ret="return str(dest)",
    )


def py_bounds_index(rng, ids, bad):
    arg = ids.var("index", "pos", "slot", "idx")
    items = ids.var(ids.noun + "s", "items", "entries")
    check = f"if {arg} >= len({items}):" if bad else f"if not 0 <= {arg} < len({items}):"
    return dict(
        params=[items, arg],
        pre=[f"{arg} = int({arg})"],
        core=[check, '    raise IndexError("out of range")'],
        post=[f"chosen = {items}[{arg}]"],
        ret="return chosen",
    )


def py_bounds_header(rng, ids, bad):
    buf = ids.var("buf", "blob", "packet", "raw")
    core = [f'length = struct.unpack_from(">I", {buf}, 0)[0]']
    if not bad:
        core += [f"if length > len({buf}) - 4:", '    raise ValueError("truncated record")']
    return dict(
        params=[buf],
        pre=[f"if len({buf}) < 4:", '    raise ValueError("short header")'],
        core=core,
        post=[f"body = {buf}[4:4 + length]", "payload = bytes(body)"],
        ret="return payload",
    )


def py_creds_const(rng, ids, bad):
    user = ids.var("db_user", "username", "login")
    host = rng.choice(HOSTS).format(n=rng.randint(2, 254))
    if bad:
        core = [f'password = "{rng.choice(SECRETS)}"']
    else:
        core = ['password = os.environ["DB_PASSWORD"]']
    return dict(
        params=[user],
        pre=[],
        core=core,
        post=[f'conn = psycopg2.connect(host="{host}", user={user}, password=password)'],
        ret="return conn",
    )


def py_creds_apikey(rng, ids, bad):
    key = rng.choice(KEY_PREFIXES) + "".join(
        rng.choice("abcdefghijkmnpqrstuvwxyz23456789") for _ in range(24)
    )
    if bad:
        core = [f'headers = {{"Authorization": "Bearer {key}"}}']
    else:
        core = [
            'token = secrets_client.get("' + ids.noun + '-api-token")',
            'headers = {"Authorization": f"Bearer {token}"}',
        ]
    return dict(
        params=["url"],
        pre=[],
        core=core,
        post=["resp = requests.get(url, headers=headers, timeout=10)", "resp.raise_for_status()"],
        ret="return resp.json()",
    )


def py_creds_default(rng, ids, bad):
    if bad:
        core = [f'secret = config.get("jwt_secret", "{rng.choice(SECRETS)}")']
    else:
        core = [
            'secret = config.get("jwt_secret")',
            "if not secret:",
            '    raise RuntimeError("jwt_secret is not configured")',
        ]
    return dict(
        params=["config", "claims"],
        pre=[],
        core=core,
        post=['token = jwt.encode(claims, secret, algorithm="HS256")'],
        ret="return token",
    )


def py_unchecked_match(rng, ids, bad):
    line = ids.var("line", "header", "raw")
    core = [f'm = re.match(r"{ids.col}=(\\w+)", {line})']
    if not bad:
        core += ["if m is None:", "    return None"]
    return dict(params=[line], pre=[], core=core, post=["value = m.group(1)"], ret="return value")


def py_unchecked_get(rng, ids, bad):
    key = ids.var("user_id", "key", "ident")
    core = [f"obj = cache.get({key})"]
    if not bad:
        core += [
            "if obj is None:",
            f"    obj = repo.load({key})",
            "    if obj is None:",
            f"        raise KeyError({key})",
        ]
    return dict(
        params=["cache", "repo", key],
        pre=[],
        core=core,
        post=[f"obj.{ids.col2} = time.time()"],
        ret=f"return obj.{ids.col}",
    )


def py_unchecked_subprocess(rng, ids, bad):
    src = ids.var("src", "archive", "source")
    if bad:
        core = [f'subprocess.run(["tar", "-xzf", {src}, "-C", dest])']
    else:
        core = [
            f'result = subprocess.run(["tar", "-xzf", {src}, "-C", dest])',
            "if result.returncode != 0:",
            '    raise RuntimeError(f"tar failed with {result.returncode}")',
        ]
    return dict(
        params=[src, "dest"],
        pre=[],
        core=core,
        post=["os.remove(" + src + ")"],
        ret="return os.listdir(dest)",
    )


# ----- C


def c_sql_sprintf(rng, ids, bad):
    arg = ids.var(ids.col, "name", "key")
    if bad:
        core = [
            "char sql[512];",
            f"snprintf(sql, sizeof sql, \"SELECT {ids.col2} FROM {ids.table} WHERE {ids.col} = '%s';\", {arg});",
            "int rc = sqlite3_exec(db, sql, on_row, ctx, NULL);",
        ]
    else:
        core = [
            "sqlite3_stmt *stmt = NULL;",
            f'int rc = sqlite3_prepare_v2(db, "SELECT {ids.col2} FROM {ids.table} WHERE {ids.col} = ?;", -1, &stmt, NULL);',
            "if (rc != SQLITE_OK) {",
            "    return rc;",
            "}",
            f"sqlite3_bind_text(stmt, 1, {arg}, -1, SQLITE_TRANSIENT);",
            "while ((rc = sqlite3_step(stmt)) == SQLITE_ROW) {",
            "    on_row(ctx, 1, NULL, NULL);",
            "}",
            "sqlite3_finalize(stmt);",
        ]
    return dict(
        ret_type="int",
        params=["sqlite3 *db", f"const char *{arg}", "void *ctx"],
        pre=[],
        core=core,
        post=[],
        ret="return rc;",
    )


def c_sql_strcat(rng, ids, bad):
    arg = ids.var("user", "owner", "term")
    if bad:
        core = [
            "char query[256];",
            f'strcpy(query, "DELETE FROM {ids.table} WHERE {ids.col} = \'");',
            f"strncat(query, {arg}, sizeof query - strlen(query) - 3);",
            'strcat(query, "\'");',
            "int rc = mysql_query(conn, query);",
        ]
    else:
        core = [
            "MYSQL_STMT *st = mysql_stmt_init(conn);",
            f'const char *q = "DELETE FROM {ids.table} WHERE {ids.col} = ?";',
            "mysql_stmt_prepare(st, q, strlen(q));",
            "MYSQL_BIND b[1];",
            "memset(b, 0, sizeof b);",
            f"b[0].buffer_type = MYSQL_TYPE_STRING; b[0].buffer = (char *){arg}; b[0].buffer_length = strlen({arg});",
            "mysql_stmt_bind_param(st, b);",
            "int rc = mysql_stmt_execute(st);",
            "mysql_stmt_close(st);",
        ]
    return dict(
        ret_type="int",
        params=["MYSQL *conn", f"const char *{arg}"],
        pre=[],
        core=core,
        post=[],
        ret="return rc;",
    )


def c_path_snprintf(rng, ids, bad):
    arg = ids.var("name", "file", "rel")
    core = ["char path[PATH_MAX];"]
    if not bad:
        core += [
            f"if ({arg}[0] == '/' || strstr({arg}, \"..\") != NULL) {{",
            "    errno = EACCES;",
            "    return NULL;",
            "}",
        ]
    core += [f'snprintf(path, sizeof path, "%s/%s", "{ids.dir}", {arg});']
    return dict(
        ret_type="FILE *",
        params=[f"const char *{arg}"],
        pre=[],
        core=core,
        post=[],
        ret='return fopen(path, "rb");',
    )


def c_path_realpath(rng, ids, bad):
    arg = ids.var("req_path", "input", "relname")
    core = ["char joined[PATH_MAX];", f'snprintf(joined, sizeof joined, "{ids.dir}/%s", {arg});']
    if bad:
        core += ["int fd = open(joined, O_RDONLY);"]
    else:
        core += [
            "char resolved[PATH_MAX];",
            "if (realpath(joined, resolved) == NULL) {",
            "    return -1;",
            "}",
            f'if (strncmp(resolved, "{ids.dir}/", strlen("{ids.dir}/")) != 0) {{',
            "    return -1;",
            "}",
            "int fd = open(resolved, O_RDONLY);",
        ]
    return dict(ret_type="int", params=[f"const char *{arg}"], pre=[], core=core, post=[], ret="return fd;")


def c_bounds_array(rng, ids, bad):
    idx = ids.var("idx", "slot", "channel", "index")
    arr = ids.var("table", "values", "slots", "counts")
    cap = rng.choice(["MAX_ENTRIES", "TABLE_SIZE", str(rng.choice([16, 32, 64, 128, 256]))])
    check = f"if ({idx} < 0) {{" if bad else f"if ({idx} < 0 || {idx} >= {cap}) {{"
    return dict(
        ret_type="int",
        params=[f"int {arr}[{cap}]", f"int {idx}", "int value"],
        pre=[],
        core=[check, "    return -1;", "}", f"{arr}[{idx}] = value;"],
        post=[],
        ret="return 0;",
    )


def c_bounds_memcpy(rng, ids, bad):
    src, n = ids.var("src", "input", "data"), ids.var("len", "n", "size")
    dst = ids.var("out", "dst", "buffer")
    core = []
    if not bad:
        core += [f"if ({n} > sizeof {dst}->payload) {{", "    return -EINVAL;", "}"]
    core += [f"memcpy({dst}->payload, {src}, {n});", f"{dst}->length = {n};"]
    return dict(
        ret_type="int",
        params=[f"struct {ids.noun}_msg *{dst}", f"const uint8_t *{src}", f"size_t {n}"],
        pre=[],
        core=core,
        post=[],
        ret="return 0;",
    )


def c_bounds_loop(rng, ids, bad):
    buf, cnt = ids.var("buf", "line", "dest"), ids.var("count", "n", "len")
    cond = f"i <= {cnt}" if bad else f"i < {cnt} && i < cap - 1"
    return dict(
        ret_type="size_t",
        params=[f"char *{buf}", "size_t cap", "const char *src", f"size_t {cnt}"],
        pre=["size_t i;"],
        core=[f"for (i = 0; {cond}; ++i) {{", f"    {buf}[i] = src[i];", "}", f"{buf}[i] = '\\0';"],
        post=[],
        ret="return i;",
    )


def c_creds_define(rng, ids, bad):
    host = rng.choice(HOSTS).format(n=rng.randint(2, 254))
    if bad:
        core = [f'const char *password = "{rng.choice(SECRETS)}";']
    else:
        core = [
            'const char *password = getenv("DB_PASSWORD");',
            "if (password == NULL) {",
            "    return NULL;",
            "}",
        ]
    return dict(
        ret_type="PGconn *",
        params=["const char *user"],
        pre=[],
        core=core,
        post=[
            "char conninfo[256];",
            f'snprintf(conninfo, sizeof conninfo, "host={host} user=%s password=%s", user, password);',
        ],
        ret="return PQconnectdb(conninfo);",
    )


def c_creds_compare(rng, ids, bad):
    arg = ids.var("pin", "passphrase", "secret")
    if bad:
        core = [
            f'if (strcmp({arg}, "{rng.choice(SECRETS)}") == 0) {{',
            "    grant_admin(session);",
            "    return 1;",
            "}",
        ]
    else:
        core = [
            "unsigned char digest[32];",
            f"hash_password({arg}, session->salt, digest);",
            "if (ct_memcmp(digest, session->stored_hash, sizeof digest) == 0) {",
            "    grant_admin(session);",
            "    return 1;",
            "}",
        ]
    return dict(
        ret_type="int",
        params=["struct session *session", f"const char *{arg}"],
        pre=[],
        core=core,
        post=[],
        ret="return 0;",
    )


def c_unchecked_malloc(rng, ids, bad):
    n = ids.var("n", "count", "len")
    core = [f"struct {ids.noun} *items = malloc({n} * sizeof *items);"]
    if not bad:
        core += ["if (items == NULL) {", "    return NULL;", "}"]
    core += [f"memset(items, 0, {n} * sizeof *items);"]
    return dict(
        ret_type=f"struct {ids.noun} *",
        params=[f"size_t {n}"],
        pre=[],
        core=core,
        post=[],
        ret="return items;",
    )


def c_unchecked_fopen(rng, ids, bad):
    core = ['FILE *fp = fopen(path, "r");']
    if not bad:
        core += ["if (fp == NULL) {", '    perror("fopen");', "    return -1;", "}"]
    core += [
        "char line[256];",
        "int lines = 0;",
        "while (fgets(line, sizeof line, fp) != NULL) {",
        "    lines++;",
        "}",
        "fclose(fp);",
    ]
    return dict(ret_type="int", params=["const char *path"], pre=[], core=core, post=[], ret="return lines;")


def c_unchecked_read(rng, ids, bad):
    buf = ids.var("buf", "header", "chunk")
    if bad:
        core = [f"read(fd, {buf}, sizeof {buf});", f"uint32_t magic = *(uint32_t *){buf};"]
    else:
        core = [
            f"ssize_t got = read(fd, {buf}, sizeof {buf});",
            f"if (got != (ssize_t)sizeof {buf}) {{",
            "    return -EIO;",
            "}",
            f"uint32_t magic = *(uint32_t *){buf};",
        ]
    return dict(
        ret_type="int",
        params=["int fd"],
        pre=[f"unsigned char {buf}[16];"],
        core=core,
        post=[f"if (magic != 0x{rng.randint(0x1000, 0xFFFF):04X}u) {{", "    return -EINVAL;", "}"],
        ret="return 0;",
    )


def c_unchecked_strchr(rng, ids, bad):
    sep = rng.choice(["':'", "'='", "','", "'/'"])
    core = [f"char *sep = strchr(line, {sep});"]
    if not bad:
        core += ["if (sep == NULL) {", "    return -1;", "}"]
    core += [
        "*sep = '\\0';",
        f"strncpy(out->{ids.col}, line, sizeof out->{ids.col} - 1);",
        f"strncpy(out->{ids.col2}, sep + 1, sizeof out->{ids.col2} - 1);",
    ]
    return dict(
        ret_type="int",
        params=["char *line", f"struct {ids.noun}_kv *out"],
        pre=[],
        core=core,
        post=[],
        ret="return 0;",
    )


# (language, category) -> templates; the LAST of each list is held out for the test files.
TEMPLATES: dict[tuple[str, str], list[Template]] = {
    ("python", "sql_injection"): [py_sql_concat, py_sql_percent, py_sql_join, py_sql_fstring],
    ("python", "path_traversal"): [py_path_join, py_path_pathlib, py_path_send],
    ("python", "bounds_check"): [py_bounds_index, py_bounds_header],
    ("python", "hardcoded_credentials"): [py_creds_const, py_creds_default, py_creds_apikey],
    ("python", "unchecked_return"): [py_unchecked_match, py_unchecked_subprocess, py_unchecked_get],
    ("c", "sql_injection"): [c_sql_sprintf, c_sql_strcat],
    ("c", "path_traversal"): [c_path_snprintf, c_path_realpath],
    ("c", "bounds_check"): [c_bounds_array, c_bounds_loop, c_bounds_memcpy],
    ("c", "hardcoded_credentials"): [c_creds_define, c_creds_compare],
    ("c", "unchecked_return"): [c_unchecked_malloc, c_unchecked_fopen, c_unchecked_strchr, c_unchecked_read],
}


def templates_for(split: str) -> list[tuple[str, str, Template]]:
    out = []
    for (lang, cat), ts in sorted(TEMPLATES.items()):
        chosen = ts[-1:] if split == "test" else ts[:-1]
        out += [(lang, cat, t) for t in chosen]
    return out


# --------------------------------------------------------------------------- assembly


def indent(lines: list[str], n: int) -> list[str]:
    return [(" " * n + x) if x else x for x in lines]


def render(rng: random.Random, lang: str, template: Template, bad: bool) -> str:
    ids = Ids(rng, lang)
    t = template(rng, ids, bad)
    verb = rng.choice(VERBS + ACTIONS)
    fname = ids.name(f"{verb}_{ids.noun}" + rng.choice(["", "", "_by_" + ids.col, "_v2", "_safe", "_impl"]))
    params = t["params"]
    names = [p.split()[-1].lstrip("*").split("[")[0] for p in params]
    before, after = fill_count(rng), fill_count(rng) // 2
    filler = py_filler if lang == "python" else c_filler
    pre_fill = [line for k in range(before) for line in filler(rng, names, k)]
    post_fill = [line for k in range(after) for line in filler(rng, names, before + k)]
    body = t["pre"] + pre_fill + t["core"] + post_fill + t["post"] + [t["ret"]]
    if lang == "python":
        head = f"def {fname}({', '.join(params)}):"
        return "\n".join([head, *indent(body, 4)]) + "\n"
    static = "static " if rng.random() < 0.3 else ""
    head = f"{static}{t['ret_type']} {fname}({', '.join(params)})"
    brace = [head, "{"] if rng.random() < 0.7 else [head + " {"]
    return "\n".join([*brace, *indent(body, 4), "}"]) + "\n"


def make(count: int, positive: float, split: str, seed: int) -> list[dict]:
    rng = random.Random(seed)
    pool = templates_for(split)
    n_pos = round(count * positive)
    labels = [1] * n_pos + [0] * (count - n_pos)
    rng.shuffle(labels)
    rows, seen = [], set()
    for i, label in enumerate(labels):
        while True:
            lang, cat, template = pool[rng.randrange(len(pool))]
            text = render(rng, lang, template, bool(label))
            if text not in seen:
                seen.add(text)
                break
        rows.append(
            {
                "id": f"{split}-{i:05d}",
                "text": text,
                "label": label,
                "language": lang,
                "category": cat,
                "template": template.__name__,
            }
        )
    return rows


def write(out: Path) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for k, (name, (count, positive, split)) in enumerate(COUNTS.items()):
        rows = make(count, positive, split, SEED + 1000 * k)
        with open(out / f"{name}.jsonl", "w", encoding="utf-8", newline="\n") as fh:
            for r in rows:
                fh.write(json.dumps(r, ensure_ascii=False) + "\n")
        counts[name] = len(rows)
    return counts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output directory")
    args = parser.parse_args(argv)
    for name, count in write(args.out).items():
        print(f"{name}.jsonl: {count} rows")


if __name__ == "__main__":
    main()
