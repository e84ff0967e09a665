"""A Helm chart for a converted service: a Deployment with the SGX device resource, the CAS/LAS environment
and the volumes as values. Written as files; rendered by Helm, not by sconify."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sconify import __version__
from sconify.policy.session import dump_yaml

_CHART_NAME_RE = re.compile(r"[^a-z0-9-]+")

_DEPLOYMENT = """\
apiVersion: apps/v1
kind: {{ .Values.kind }}
metadata:
  name: {{ include "chart.fullname" . }}
  labels:
    app.kubernetes.io/name: {{ .Chart.Name }}
    app.kubernetes.io/instance: {{ .Release.Name }}
    app.kubernetes.io/managed-by: {{ .Release.Service }}
spec:
  replicas: {{ .Values.replicas }}
  selector:
    matchLabels:
      app.kubernetes.io/name: {{ .Chart.Name }}
      app.kubernetes.io/instance: {{ .Release.Name }}
  template:
    metadata:
      labels:
        app.kubernetes.io/name: {{ .Chart.Name }}
        app.kubernetes.io/instance: {{ .Release.Name }}
    spec:
      {{- with .Values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      containers:
        - name: {{ .Chart.Name }}
          image: "{{ .Values.image.repository }}{{ if .Values.image.digest }}@{{ .Values.image.digest }}{{ else }}:{{ .Values.image.tag }}{{ end }}"
          imagePullPolicy: {{ .Values.image.pullPolicy }}
          env:
            - name: SCONE_CAS_ADDR
              value: {{ .Values.scone.cas | quote }}
            - name: SCONE_LAS_ADDR
              {{- if .Values.scone.las }}
              value: {{ .Values.scone.las | quote }}
              {{- else }}
              valueFrom:
                fieldRef:
                  fieldPath: status.hostIP
              {{- end }}
            - name: SCONE_CONFIG_ID
              value: {{ .Values.scone.configId | quote }}
          resources:
            limits:
              sgx.intel.com/enclave: {{ .Values.sgx.enclaves }}
              {{- with .Values.resources.limits }}
              {{- toYaml . | nindent 14 }}
              {{- end }}
            {{- with .Values.resources.requests }}
            requests:
              {{- toYaml . | nindent 14 }}
            {{- end }}
          {{- if .Values.volumes }}
          volumeMounts:
            {{- range .Values.volumes }}
            - name: {{ .name }}
              mountPath: {{ .mountPath }}
            {{- end }}
          {{- end }}
      {{- if .Values.volumes }}
      volumes:
        {{- range .Values.volumes }}
        - name: {{ .name }}
          persistentVolumeClaim:
            claimName: {{ include "chart.fullname" $ }}-{{ .name }}
        {{- end }}
      {{- end }}
"""

_PVC = """\
{{- range .Values.volumes }}
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ include "chart.fullname" $ }}-{{ .name }}
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: {{ .size | default "1Gi" }}
{{- end }}
"""

_HELPERS = """\
{{- define "chart.fullname" -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
"""


@dataclass(frozen=True)
class ChartSpec:
    """What the chart needs to know about the converted service."""

    name: str
    repository: str
    tag: str | None
    digest: str | None
    config_id: str
    cas: str
    las: str | None
    volumes: tuple[tuple[str, str], ...] = ()  # (name, mount path)


def chart_name(text: str) -> str:
    """A valid chart name (lower-case letters, digits, '-') from a service or repository name."""
    name = _CHART_NAME_RE.sub("-", text.lower()).strip("-")
    return name[:53] or "service"


def chart_files(spec: ChartSpec) -> dict[str, str]:
    """The chart's files by relative path."""
    chart = {
        "apiVersion": "v2",
        "name": chart_name(spec.name),
        "description": f"Confidential {spec.name} converted by sconify for SCONE on Intel SGX.",
        "type": "application",
        "version": "0.1.0",
        "appVersion": spec.tag or (spec.digest or "")[7:19] or "latest",
        "annotations": {"sconify.io/version": __version__},
    }
    values: dict[str, Any] = {
        "kind": "Deployment",
        "replicas": 1,
        "image": {
            "repository": spec.repository,
            "tag": spec.tag or "latest",
            "digest": spec.digest or "",
            "pullPolicy": "IfNotPresent",
        },
        "imagePullSecrets": [],
        "scone": {"cas": spec.cas, "las": spec.las or "", "configId": spec.config_id},
        "sgx": {"enclaves": 1},
        "resources": {"limits": {}, "requests": {}},
        "volumes": [{"name": n, "mountPath": p, "size": "1Gi"} for n, p in spec.volumes],
    }
    return {
        "Chart.yaml": dump_yaml(chart),
        "values.yaml": dump_yaml(values),
        "templates/_helpers.tpl": _HELPERS,
        "templates/deployment.yaml": _DEPLOYMENT,
        "templates/pvc.yaml": _PVC,
    }


def write_chart(spec: ChartSpec, directory: Path) -> Path:
    """Write the chart into ``directory`` atomically (a temporary sibling renamed into place)."""
    directory = Path(directory)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.absolute().parent))
    try:
        for rel, text in chart_files(spec).items():
            path = tmp / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        os.chmod(tmp, 0o755)
        if directory.exists():
            shutil.rmtree(directory)
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory
