// Evaluate AWS IAM requests against identity policies, offline, with @cloud-copilot/iam-simulate
// (an implementation of IAM's evaluation logic: Allow/Deny, wildcards, every condition operator,
// IfExists, missing context keys, and validation of actions, resource ARNs and context keys).
// Test-only (tests/test_infra_iam.py); never part of the image.
//
//   node infra/iam/simulate.mjs < request.json
//   request: {"accountId": "...", "principal": "arn:...", "policies": [{"name": ..., "policy": {...}}],
//             "requests": [{"action": "s3:GetObject", "resource": "arn:aws:s3:::b/k", "context": {...},
//                           "resourcePolicy": {...} (optional: a bucket or KMS key policy)}]}
//   stdout:  [{"action": ..., "resource": ..., "result": "Allowed" | "ImplicitlyDenied" |
//              "ExplicitlyDenied", "errors": null | {...}}, ...]
//
// The package is found under IAM_SIMULATE_MODULES (the folder holding its node_modules: `make tools`
// installs it into the validators' venv, $TOOLS_VENV/iam), else under the current directory.
import { createRequire } from 'node:module'
import { readFileSync } from 'node:fs'
import path from 'node:path'
import { pathToFileURL } from 'node:url'

const base = process.env.IAM_SIMULATE_MODULES || process.cwd()
const require = createRequire(path.join(base, 'package.json'))
const entry = require.resolve('@cloud-copilot/iam-simulate')
const { runSimulation } = await import(pathToFileURL(entry).href)

const input = JSON.parse(readFileSync(0, 'utf8'))
const out = []
for (const r of input.requests) {
  const result = await runSimulation(
    {
      request: {
        principal: input.principal,
        action: r.action,
        resource: { resource: r.resource, accountId: input.accountId },
        contextVariables: r.context || {}
      },
      identityPolicies: input.policies,
      resourcePolicy: r.resourcePolicy,
      serviceControlPolicies: [],
      resourceControlPolicies: []
    },
    { simulationMode: 'Strict' }
  )
  out.push({
    action: r.action,
    resource: r.resource,
    result: result.errors ? null : result.result.analysis.result,
    errors: result.errors || null
  })
}
process.stdout.write(JSON.stringify(out) + '\n')
