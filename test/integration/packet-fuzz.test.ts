// native/packet.h under libFuzzer with ASan and UBSan: the parser and the NAT rewrite (RFC 1624 checksum
// updates, MSS clamp) that Bumblebee applies to packets other processes send it. Builds native/fuzz/packet_fuzzer.cc
// into a temporary directory, replays every kept crash (test/fuzz/packet-crashes/) and the seed corpus
// (test/fuzz/packet-corpus/), then fuzzes for FDFERRY_FUZZ_SECONDS (30 by default) from a copy of the corpus.
// A crash found here is copied into test/fuzz/packet-crashes/ so that it stays a regression once fixed.
import t from 'tap';
import { spawn, spawnSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseTcpPacket } from '../helpers/packets.js';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const corpus = path.join(root, 'test', 'fuzz', 'packet-corpus');
const crashes = path.join(root, 'test', 'fuzz', 'packet-crashes');
const seconds = Number(process.env.FDFERRY_FUZZ_SECONDS ?? 30);
if (!Number.isInteger(seconds) || seconds < 1) throw new Error(`FDFERRY_FUZZ_SECONDS must be a whole number of seconds, not ${process.env.FDFERRY_FUZZ_SECONDS}`);

// clang++ and its libFuzzer runtime (Debian: clang, libclang-rt-14-dev) come from the pretest step as root.
const sh = (script: string) => spawnSync('sh', ['-c', script], { encoding: 'utf8' });
const hasFuzzerToolchain =
  sh('command -v clang++').status === 0 && sh('ls "$(clang++ -print-runtime-dir)"/libclang_rt.fuzzer-*.a').status === 0;
const skip =
  !hasFuzzerToolchain && process.getuid?.() !== 0
    ? 'clang++ with libFuzzer is not installed (Debian: apt-get install clang libclang-rt-14-dev; as root, npm test installs them)'
    : false;

t.setTimeout((seconds + 300) * 1000);

/** Files in a directory that are inputs (not the README), sorted. */
const inputs = (dir: string) =>
  fs.existsSync(dir)
    ? fs.readdirSync(dir).filter((name) => !/^readme/i.test(name) && fs.statSync(path.join(dir, name)).isFile()).sort().map((name) => path.join(dir, name))
    : [];

/** Runs the fuzzer binary with its output in a log file; resolves with the exit code and the log. */
function runFuzzer(binary: string, args: string[], cwd: string, log: string): Promise<{ code: number | null; signal: string | null; output: string }> {
  return new Promise((resolve, reject) => {
    const out = fs.openSync(log, 'w');
    const child = spawn(binary, args, { cwd, stdio: ['ignore', out, out] });
    child.on('error', reject);
    child.on('close', (code, signal) => {
      fs.closeSync(out);
      resolve({ code, signal, output: fs.readFileSync(log, 'utf8') });
    });
  });
}

/** What a failed run said: the failed check or sanitizer report, the first frames, libFuzzer's summary. */
function report(output: string): string {
  const lines = output.split('\n');
  const start = lines.findIndex((line) => /check failed|ERROR: |runtime error:|SUMMARY: /.test(line));
  if (start < 0) return lines.slice(-40).join('\n');
  const excerpt = lines
    .slice(start)
    .filter((line) => !/^\s+#\d+ 0x\w+ +(\(|in (fuzzer::|__sanitizer_|__libc_|_start|main ))/.test(line));
  return excerpt.slice(0, 40).join('\n');
}

/** Copies a found input into the regression directory, unless a kept file already has its bytes. */
function keep(file: string): string {
  const bytes = fs.readFileSync(file);
  const same = inputs(crashes).find((kept) => fs.readFileSync(kept).equals(bytes));
  const target = same ?? path.join(crashes, path.basename(file));
  if (!same) fs.copyFileSync(file, target);
  return path.relative(root, target);
}

t.test('packet.h under libFuzzer', { skip }, async (t) => {
  const work = fs.mkdtempSync(path.join(os.tmpdir(), 'fdferry-packet-fuzz-'));
  t.teardown(() => fs.rmSync(work, { recursive: true, force: true }));
  const binary = path.join(work, 'packet_fuzzer');

  await t.test('the seed corpus holds valid packets', async (t) => {
    const seeds = inputs(corpus);
    t.ok(seeds.length >= 20, `${seeds.length} seeds in test/fuzz/packet-corpus`);
    const tcp = seeds.filter((file) => path.basename(file).startsWith('tcp-'));
    t.ok(tcp.some((file) => fs.readFileSync(file)[0]! >> 4 === 6), 'IPv6 ones among them');
    for (const file of tcp) {
      const parsed = parseTcpPacket(fs.readFileSync(file));
      t.ok(parsed?.checksumsValid, `${path.basename(file)} is TCP with valid checksums`);
    }
  });

  await t.test('builds', async (t) => {
    const started = Date.now();
    const build = spawnSync('sh', [path.join(root, 'native', 'fuzz', 'build.sh'), binary], { cwd: root, encoding: 'utf8' });
    t.equal(build.status, 0, `native/fuzz/build.sh (clang++ -fsanitize=fuzzer,address,undefined) ${build.stderr}`);
    t.comment(`built in ${((Date.now() - started) / 1000).toFixed(1)} s`);
  });
  if (!fs.existsSync(binary)) return;

  await t.test('kept crashes and the corpus replay cleanly', async (t) => {
    const files = [...inputs(crashes), ...inputs(corpus)];
    const log = path.join(work, 'replay.log');
    const { code, signal, output } = await runFuzzer(binary, files, work, log);
    const failed = [...output.matchAll(/^Running: (.*)$/gm)].pop()?.[1];
    if (code !== 0) t.comment(report(output));
    t.equal(code, 0, code === 0 ? `${files.length} inputs replayed` : `replaying ${failed ? path.relative(root, failed) : '?'} failed (exit ${code}, signal ${signal ?? 'none'}; the report is above)`);
    t.equal((output.match(/^Executed /gm) ?? []).length, files.length, 'every input ran');
  });

  await t.test(`fuzzes for ${seconds} s without a crash`, async (t) => {
    const working = path.join(work, 'corpus');
    const artifacts = path.join(work, 'artifacts');
    fs.mkdirSync(working);
    fs.mkdirSync(artifacts);
    // The corpus grows while fuzzing: a copy, so a run leaves the repository as it was. Kept crashes seed it too.
    for (const file of [...inputs(corpus), ...inputs(crashes)]) fs.copyFileSync(file, path.join(working, path.basename(file)));
    const args = [
      `-max_total_time=${seconds}`,
      '-max_len=4096',
      '-rss_limit_mb=1024',
      '-timeout=10',
      '-print_final_stats=1',
      `-artifact_prefix=${artifacts}/`,
      working,
    ];
    const { code, signal, output } = await runFuzzer(binary, args, work, path.join(work, 'fuzz.log'));

    const found = fs.readdirSync(artifacts).filter((name) => /^(crash|leak|timeout|oom)-/.test(name));
    const kept = found.map((name) => keep(path.join(artifacts, name)));
    const stat = (key: string) => new RegExp(`^stat::${key}:\\s+(\\d+)`, 'm').exec(output)?.[1];
    const coverage = [...output.matchAll(/\bcov: (\d+) ft: (\d+) corp: (\d+)/g)].pop();
    t.comment(
      `${stat('number_of_executed_units') ?? '?'} runs, ${stat('average_exec_per_sec') ?? '?'}/s; ` +
        `coverage ${coverage?.[1] ?? '?'} edges, ${coverage?.[2] ?? '?'} features, corpus ${coverage?.[3] ?? '?'} inputs`,
    );
    const keptNote = kept.length
      ? `\nThe input is kept as ${kept.join(', ')}: it is now a regression that fails this test until native/packet.h ` +
        `(or the fuzzer, if the check was wrong) is fixed. Replay it with: native/fuzz/build.sh /tmp/f && /tmp/f ${kept[0]}`
      : '';
    if (code !== 0 || found.length) t.comment(report(output));
    t.same(found, [], `no crash, leak, timeout or out-of-memory input${keptNote}`);
    t.equal(code, 0, `libFuzzer exit code (signal ${signal ?? 'none'})${code === 0 ? '' : `; the report is above${keptNote}`}`);
    t.ok(Number(stat('number_of_executed_units') ?? 0) > 1000, 'it did run');
  });
});
