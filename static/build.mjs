// Build the pages: bundle src/ into index.html, app.js, app.css (the console
// page), consoles.html, consoles.js, consoles.css (the index of consoles) and
// the fonts/ both use.
//
//   npm run build               writes into ../cloud_console/web_assets (served by the package)
//   npm run build -- DIR        writes into DIR (for --static-dir)
//   CLOUD_CONSOLE_WEB_ASSETS=DIR npm run build
//
// Only files this build makes are replaced in the output directory. The
// licences of the bundled packages are collected into licenses.txt.

import * as esbuild from 'esbuild';
import { mkdir, readFile, rm, writeFile } from 'node:fs/promises';
import path from 'node:path';
import { fileURLToPath } from 'node:url';

const here = path.dirname(fileURLToPath(import.meta.url));
const callerDir = process.env.INIT_CWD || process.cwd();
const target = process.argv[2] || process.env.CLOUD_CONSOLE_WEB_ASSETS;
const outdir = target
  ? path.resolve(callerDir, target)
  : path.join(here, '..', 'cloud_console', 'web_assets');

// Packages whose code or fonts end up in the output.
const BUNDLED = ['@xterm/xterm', '@xterm/addon-fit', '@xterm/addon-search', '@fontsource-variable/jetbrains-mono'];

// Each page: its HTML (copied from src/) and the script bundled into ENTRY.js
// (and the styles it imports into ENTRY.css). One esbuild run per page, so that
// neither page's bundle holds the other's code.
const PAGES = [
  { html: 'index.html', entry: 'app', script: 'main.js' },
  { html: 'consoles.html', entry: 'consoles', script: 'consoles.js' },
];

async function clean() {
  await mkdir(outdir, { recursive: true });
  await rm(path.join(outdir, 'fonts'), { recursive: true, force: true });
  for (const name of [...PAGES.flatMap(({ html, entry }) => [html, `${entry}.js`, `${entry}.css`]), 'licenses.txt']) {
    await rm(path.join(outdir, name), { force: true });
  }
}

async function bundle({ entry, script }) {
  await esbuild.build({
    entryPoints: { [entry]: path.join(here, 'src', script) },
    outdir,
    bundle: true,
    minify: true,
    format: 'iife',
    target: ['es2020', 'chrome100', 'firefox100', 'safari15'],
    loader: { '.woff2': 'file' },
    assetNames: 'fonts/[name]-[hash]',
    legalComments: 'none', // the licences go to licenses.txt instead
    logLevel: 'warning',
  });
}

async function page({ html }) {
  const text = await readFile(path.join(here, 'src', html), 'utf8');
  await writeFile(path.join(outdir, html), text.replace(/\n\s*/g, '\n'));
}

async function licenses() {
  const parts = [];
  for (const name of BUNDLED) {
    const dir = path.join(here, 'node_modules', name);
    const meta = JSON.parse(await readFile(path.join(dir, 'package.json'), 'utf8'));
    const text = await readFile(path.join(dir, 'LICENSE'), 'utf8');
    parts.push(`${name} ${meta.version} (${meta.license})\n\n${text.trim()}\n`);
  }
  await writeFile(path.join(outdir, 'licenses.txt'), parts.join('\n' + '-'.repeat(72) + '\n\n'));
}

await clean();
for (const spec of PAGES) {
  await bundle(spec);
  await page(spec);
}
await licenses();
console.log(`cloud-console page built in ${outdir}`);
