"""The job role's S3 policy, evaluated as IAM would evaluate it (issue 24 items 1 and 2).

A reading of the template's statements cannot tell whether a request is allowed once conditions,
wildcards and missing context keys are involved, and SeaweedFS or moto cannot either (moto ignores
conditions; neither answers 403 for a missing key). So the template's JobRole policy is resolved
with concrete parameters, as CloudFormation would, and every request the job makes is put to an
IAM policy evaluator, @cloud-copilot/iam-simulate (npm; `make tools` installs it into the
validators' venv, infra/iam/package-lock.json pins it).

What the evaluator cannot know is S3's own rule for a missing key (AWS's GetObject/HeadObject
reference): the answer is 404 NoSuchKey if the caller has s3:ListBucket on the bucket, else 403
AccessDenied. S3 judges that permission in the context of the GetObject request, which carries
no s3:prefix. `_missing_key_status` encodes exactly that rule and asks the evaluator the
s3:ListBucket question with that context; a first real deploy confirms it (infra/aws/README.md,
"What was verified").
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "infra" / "aws" / "template.yaml"
SIMULATE = ROOT / "infra" / "iam" / "simulate.mjs"
TOOLS_VENV = Path(os.environ.get("TOOLS_VENV", ROOT / ".venv-tools"))
IAM_MODULES = TOOLS_VENV / "iam"

ACCOUNT = "123456789012"
REGION = "eu-west-1"
PRINCIPAL = f"arn:aws:sts::{ACCOUNT}:assumed-role/pogona-JobRole-ABC/task-1"
RUN = "0f1e2d3c-aaaa-bbbb-cccc-1234567890ab"  # an AWS_BATCH_JOB_ID
KMS_KEY = f"arn:aws:kms:{REGION}:{ACCOUNT}:key/1234abcd-12ab-34cd-56ef-1234567890ab"
# The other required parameters (no default), as a deploy gives them.
REQUIRED = {"ImageTag": "0.1.0-abc1234", "Subnets": "subnet-0a,subnet-0b", "SecurityGroupIds": "sg-0c"}

# Two layouts: the runs in a bucket of their own, and (as infra/aws/README.md's deploy example)
# dataset and runs in one bucket under two prefixes.
LAYOUTS = {
    "separate-buckets": {
        "DatasetBucket": "pogona-data",
        "DatasetPrefix": "pogona/dataset",
        "OutputBucket": "pogona-runs",
        "OutputPrefix": "pogona/runs",
    },
    "one-bucket": {
        "DatasetBucket": "pogona-data",
        "DatasetPrefix": "pogona/dataset",
        "OutputBucket": "pogona-data",
        "OutputPrefix": "pogona/runs",
    },
}

# Keys under <output>/ that the job reads expecting "absent" to be a normal answer: a new run has no
# manifest, lease, progress or checkpoint yet; a first run finds no latest.json or champion.json
# (job.py, lease.py, livestatus.py, checkpoint.py, promotion.py; names from the job's contract).
EXISTENCE_READS = [
    f"{RUN}/manifest.json",
    f"{RUN}/lease.json",
    f"{RUN}/progress.json",
    f"{RUN}/checkpoint/full/pointer.json",
    f"{RUN}/checkpoint/gate.json",
    f"{RUN}/checkpoint/accounting.json",
    "latest.json",
    "champion.json",
]
# What the job deletes: a finished run's checkpoint/ (accounting.json included), its progress.json
# (livestatus.close: left behind, `runs watch` reports the finished run as stalled) and the lease.
DELETED = [
    f"{RUN}/checkpoint/full/12/last.pt",
    f"{RUN}/checkpoint/full/pointer.json",
    f"{RUN}/checkpoint/accounting.json",
    f"{RUN}/progress.json",
    f"{RUN}/lease.json",
]
# What it must never delete: the results and the pointers users and deployments rely on.
NEVER_DELETED = [
    f"{RUN}/manifest.json",
    f"{RUN}/report.md",
    f"{RUN}/weights/best.pt",
    f"{RUN}/model_card.md",
    "latest.json",
    "champion.json",
]


# ------------------------------------------------------------------------------------------------
# The template, resolved as CloudFormation would for given parameters
# ------------------------------------------------------------------------------------------------


class _CfnLoader(yaml.SafeLoader):
    """SafeLoader that turns CloudFormation short forms (!Ref, !Sub, !If ...) into long forms."""


def _cfn_tag(loader: yaml.SafeLoader, suffix: str, node: yaml.Node) -> dict[str, Any]:
    value: Any
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
    elif isinstance(node, yaml.SequenceNode):
        value = loader.construct_sequence(node, deep=True)
    else:
        value = loader.construct_mapping(node, deep=True)  # type: ignore[arg-type]
    if suffix == "Ref":
        return {"Ref": value}
    if suffix == "GetAtt" and isinstance(value, str):
        value = value.split(".", 1)
    return {f"Fn::{suffix}": value}


_CfnLoader.add_multi_constructor("!", _cfn_tag)

_NO_VALUE = object()


class Stack:
    """Just enough of CloudFormation's intrinsic functions to resolve IAM policy documents."""

    def __init__(self, template: dict[str, Any], parameters: dict[str, str]) -> None:
        self.template = template
        self.values: dict[str, Any] = {
            "AWS::Partition": "aws",
            "AWS::Region": REGION,
            "AWS::AccountId": ACCOUNT,
            "AWS::URLSuffix": "amazonaws.com",
            "AWS::StackName": "pogona",
        }
        for name, spec in template["Parameters"].items():
            value = {**REQUIRED, **parameters}.get(name, spec.get("Default"))
            if value is None:
                raise AssertionError(f"parameter {name} has no default; give it")
            self.values[name] = value.split(",") if spec["Type"] == "CommaDelimitedList" else str(value)

    def condition(self, name: str) -> bool:
        return bool(self.resolve(self.template["Conditions"][name]))

    def resolve(self, node: Any) -> Any:
        if isinstance(node, list):
            return [v for v in (self.resolve(x) for x in node) if v is not _NO_VALUE]
        if not isinstance(node, dict):
            return node
        if len(node) == 1:
            (key, arg), *_ = node.items()
            if key == "Ref":
                return _NO_VALUE if arg == "AWS::NoValue" else self.values[arg]
            if key == "Fn::Sub":
                return re.sub(r"\$\{([^}]+)\}", lambda m: str(self.values[m.group(1)]), arg)
            if key == "Fn::If":
                name, yes, no = arg
                return self.resolve(yes if self.condition(name) else no)
            if key == "Fn::Equals":
                left, right = (self.resolve(a) for a in arg)
                return left == right
            if key == "Fn::Not":
                return not self.resolve(arg[0])
            if key == "Fn::And":
                return all(self.resolve(a) for a in arg)
            if key == "Fn::Or":
                return any(self.resolve(a) for a in arg)
            if key == "Condition":
                return self.condition(arg)
            if key == "Fn::Join":
                return arg[0].join(self.resolve(arg[1]))
            if key == "Fn::Select":
                return self.resolve(arg[1])[int(arg[0])]
            if key == "Fn::FindInMap":
                mapping, top, second = (self.resolve(a) for a in arg)
                return self.template["Mappings"][mapping][top][second]
        out = {k: self.resolve(v) for k, v in node.items()}
        return {k: v for k, v in out.items() if v is not _NO_VALUE}

    def role_policies(self, role: str) -> list[dict[str, Any]]:
        props = self.template["Resources"][role]["Properties"]
        return [{"name": p["PolicyName"], "policy": self.resolve(p["PolicyDocument"])} for p in props["Policies"]]


@pytest.fixture(scope="module")
def template() -> dict[str, Any]:
    return yaml.load(TEMPLATE.read_text(encoding="utf-8"), Loader=_CfnLoader)


# ------------------------------------------------------------------------------------------------
# The evaluator
# ------------------------------------------------------------------------------------------------


def _evaluate(policies: list[dict[str, Any]], requests: list[dict[str, Any]]) -> list[str]:
    """IAM's decision for each request: Allowed, ImplicitlyDenied or ExplicitlyDenied."""
    node = shutil.which("node")
    if node is None or not (IAM_MODULES / "node_modules" / "@cloud-copilot" / "iam-simulate").is_dir():
        pytest.fail(
            f"the IAM policy evaluator is missing from {IAM_MODULES} (Node.js and `make tools` needed: "
            "bash infra/validate.sh --install)"
        )
    payload = {"accountId": ACCOUNT, "principal": PRINCIPAL, "policies": policies, "requests": requests}
    env = {**os.environ, "IAM_SIMULATE_MODULES": str(IAM_MODULES)}
    done = subprocess.run(
        [node, str(SIMULATE)], input=json.dumps(payload), capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr
    answers = json.loads(done.stdout)
    # The evaluator validates each request (action exists, ARN fits the action, context keys allowed for
    # it): an invalid request is a bug in this test, never a silent deny.
    for request, answer in zip(requests, answers, strict=True):
        assert answer["errors"] is None, (request, answer["errors"])
    return [a["result"] for a in answers]


def _s3(action: str, bucket: str, key: str | None = None, **context: str) -> dict[str, Any]:
    resource = f"arn:aws:s3:::{bucket}" + ("" if key is None else f"/{key}")
    return {"action": action, "resource": resource, "context": context}


def _missing_key_status(policies: list[dict[str, Any]], bucket: str, key: str) -> int:
    """S3's answer to a GetObject/HeadObject of a key that does not exist, for this policy.

    AWS's rule (GetObject and HeadObject API reference): 404 if the caller has s3:ListBucket on the
    bucket, 403 otherwise. The ListBucket question is asked with the GetObject's request context,
    which has no s3:prefix (that key exists only on a listing request)."""
    can_read, can_list = _evaluate(policies, [_s3("s3:GetObject", bucket, key), _s3("s3:ListBucket", bucket)])
    if can_read != "Allowed":
        return 403
    return 404 if can_list == "Allowed" else 403


# ------------------------------------------------------------------------------------------------
# Item 1: a new run's "does it exist" reads answer 404, not 403 (which the job maps to exit 4)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_missing_objects_under_the_output_read_as_absent(template: dict[str, Any], layout: str) -> None:
    params = LAYOUTS[layout]
    policies = Stack(template, params).role_policies("JobRole")
    out, prefix = params["OutputBucket"], params["OutputPrefix"]
    for key in EXISTENCE_READS:
        status = _missing_key_status(policies, out, f"{prefix}/{key}")
        assert status == 404, f"{key}: S3 would answer {status}, the job would stop with exit 4 (access denied)"


def test_the_check_catches_a_listing_grant_conditioned_on_the_prefix(template: dict[str, Any]) -> None:
    """The previous policy (ListBucket only under an s3:prefix condition) gave every new run exit 4."""
    params = LAYOUTS["separate-buckets"]
    policies = Stack(template, params).role_policies("JobRole")
    old = copy.deepcopy(policies)
    for policy in old:
        for st in policy["policy"]["Statement"]:
            if st["Action"] == "s3:ListBucket" and st["Resource"].endswith(params["OutputBucket"]):
                prefix = params["OutputPrefix"]
                st["Condition"] = {"StringLike": {"s3:prefix": [prefix, f"{prefix}/*"]}}
    key = f"{params['OutputPrefix']}/{RUN}/manifest.json"
    assert _missing_key_status(old, params["OutputBucket"], key) == 403
    assert _missing_key_status(policies, params["OutputBucket"], key) == 404


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_listing_reads_and_writes_stay_in_their_prefixes(template: dict[str, Any], layout: str) -> None:
    params = LAYOUTS[layout]
    policies = Stack(template, params).role_policies("JobRole")
    data, dprefix = params["DatasetBucket"], params["DatasetPrefix"]
    out, oprefix = params["OutputBucket"], params["OutputPrefix"]
    allowed = [
        _s3("s3:ListBucket", data, **{"s3:prefix": dprefix}),  # storage.check_bucket, before any work
        _s3("s3:ListBucket", data, **{"s3:prefix": f"{dprefix}/"}),  # the dataset pull
        _s3("s3:ListBucket", out, **{"s3:prefix": oprefix}),
        _s3("s3:ListBucket", out, **{"s3:prefix": f"{oprefix}/"}),  # `runs`, checkpoint sets
        _s3("s3:GetObject", data, f"{dprefix}/images/train/a.jpg"),
        _s3("s3:GetObject", out, f"{oprefix}/{RUN}/checkpoint/full/12/last.pt"),
        _s3("s3:PutObject", out, f"{oprefix}/{RUN}/weights/best.pt"),
        _s3("s3:PutObject", out, f"{oprefix}/latest.json"),
        _s3("s3:AbortMultipartUpload", out, f"{oprefix}/{RUN}/weights/best.pt"),
        _s3("s3:ListMultipartUploadParts", out, f"{oprefix}/{RUN}/weights/best.pt"),
    ]
    denied = [
        _s3("s3:GetObject", data, "elsewhere/secret.csv"),  # reads stay in the two prefixes
        _s3("s3:GetObject", out, "other-team/model.pt"),
        _s3("s3:PutObject", data, f"{dprefix}/images/train/a.jpg"),  # the dataset is read-only
        _s3("s3:PutObject", out, "other-team/model.pt"),
        _s3("s3:DeleteObject", data, f"{dprefix}/labels/train/a.txt"),
        _s3("s3:PutBucketPolicy", out),
        _s3("s3:DeleteBucket", out),
    ]
    if data != out:  # a shared bucket is listable as a whole (item 1); a dataset bucket of its own is not
        denied.append(_s3("s3:ListBucket", data, **{"s3:prefix": "elsewhere/"}))
    results = _evaluate(policies, allowed + denied)
    for request, result in zip(allowed + denied, results, strict=True):
        expected = "Allowed" if request in allowed else "ImplicitlyDenied"
        assert result == expected, (request, result)


# ------------------------------------------------------------------------------------------------
# Item 2: the job may delete what it deletes, and nothing else
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_the_job_deletes_exactly_its_transient_objects(template: dict[str, Any], layout: str) -> None:
    params = LAYOUTS[layout]
    policies = Stack(template, params).role_policies("JobRole")
    out, prefix = params["OutputBucket"], params["OutputPrefix"]
    # DeleteObjects (the checkpoint sweep) is authorised per key as s3:DeleteObject.
    requests = [_s3("s3:DeleteObject", out, f"{prefix}/{key}") for key in DELETED + NEVER_DELETED]
    results = dict(zip(DELETED + NEVER_DELETED, _evaluate(policies, requests), strict=True))
    for key in DELETED:
        assert results[key] == "Allowed", f"the job deletes {key}; the role refuses it"
    for key in NEVER_DELETED:
        assert results[key] == "ImplicitlyDenied", f"the job never deletes {key}; the role must refuse it"


# ------------------------------------------------------------------------------------------------
# The optional bucket KMS key: only through S3
# ------------------------------------------------------------------------------------------------


def test_the_bucket_key_is_usable_only_through_s3(template: dict[str, Any]) -> None:
    params = {**LAYOUTS["separate-buckets"], "BucketKmsKeyArn": KMS_KEY}
    policies = Stack(template, params).role_policies("JobRole")
    via_s3 = {"kms:ViaService": f"s3.{REGION}.amazonaws.com"}
    # KMS honours identity policies only where the key policy delegates to the account: AWS's default
    # key policy does exactly that.
    key_policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }
    requests = [
        {"action": action, "resource": KMS_KEY, "context": context, "resourcePolicy": key_policy}
        for action, context in (("kms:Decrypt", via_s3), ("kms:GenerateDataKey", via_s3), ("kms:Decrypt", {}))
    ]
    assert _evaluate(policies, requests) == ["Allowed", "Allowed", "ImplicitlyDenied"]
    without = Stack(template, LAYOUTS["separate-buckets"]).role_policies("JobRole")
    assert _evaluate(without, requests[:1]) == ["ImplicitlyDenied"]
