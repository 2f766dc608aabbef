{{/*
Helpers of the atlasflow chart. Component-aware helpers take a dict:
  (dict "ctx" $ "component" "ingest")
where ctx is the root context and component one of ingest, segmentation, ranking, labels,
triton (or "" for release-wide objects such as the ConfigMap).
*/}}

{{/* Chart name, overridable with nameOverride. */}}
{{- define "atlasflow.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Fully qualified release name (prefix of every resource). Truncated at 63 characters because
some Kubernetes name fields are limited to that (DNS-1123 labels).
*/}}
{{- define "atlasflow.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* chart label value: name-version. */}}
{{- define "atlasflow.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Name of a component's resources: <fullname>-<component>. */}}
{{- define "atlasflow.componentName" -}}
{{- printf "%s-%s" (include "atlasflow.fullname" .ctx) .component | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Selector labels (immutable once deployed: never add version-like labels here). */}}
{{- define "atlasflow.selectorLabels" -}}
app.kubernetes.io/name: {{ include "atlasflow.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
{{- if .component }}
app.kubernetes.io/component: {{ .component }}
{{- end }}
{{- end -}}

{{/* Common labels of every object. */}}
{{- define "atlasflow.labels" -}}
helm.sh/chart: {{ include "atlasflow.chart" .ctx }}
{{ include "atlasflow.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: atlasflow
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end -}}

{{/* ServiceAccount name. */}}
{{- define "atlasflow.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "atlasflow.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Image reference of a component: [registry/]repository:tag, where the tag falls back to
image.tag, then the chart's appVersion. "latest" is refused (values.schema.json refuses it too).
With <component>.image.digest (sha256:...): [registry/]repository@digest, the image pinned by
content (the tag is then not used).
*/}}
{{- define "atlasflow.image" -}}
{{- $img := index .ctx.Values .component "image" -}}
{{- include "atlasflow.imageRef" (dict "ctx" .ctx "component" .component "registry" $img.registry "repository" $img.repository "tag" (default .ctx.Values.image.tag $img.tag) "digest" $img.digest) -}}
{{- end -}}

{{/* [registry/]repository@digest, else [registry/]repository:tag (tag "" = appVersion).
  (dict "ctx" $ "component" "training" "registry" "" "repository" "r" "tag" "" "digest" "") */}}
{{- define "atlasflow.imageRef" -}}
{{- $registry := default .ctx.Values.global.imageRegistry .registry -}}
{{- $tag := default .ctx.Chart.AppVersion .tag | toString -}}
{{- if eq $tag "latest" -}}
{{- fail (printf "%s: the image tag must be a fixed version, not \"latest\"" .component) -}}
{{- end -}}
{{- $repo := ternary (printf "%s/%s" $registry .repository) .repository (ne $registry "") -}}
{{- if .digest -}}
{{- printf "%s@%s" $repo .digest -}}
{{- else -}}
{{- printf "%s:%s" $repo $tag -}}
{{- end -}}
{{- end -}}

{{/* Image pull policy of a component. */}}
{{- define "atlasflow.imagePullPolicy" -}}
{{- $img := index .ctx.Values .component "image" -}}
{{- default .ctx.Values.image.pullPolicy $img.pullPolicy -}}
{{- end -}}

{{/*
host:port of a component's Service, for the *_TARGET settings of the services that call it.
  (dict "ctx" $ "component" "segmentation" "port" 50052)
*/}}
{{- define "atlasflow.target" -}}
{{- printf "%s:%v" (include "atlasflow.componentName" .) .port -}}
{{- end -}}

{{/* Name of the ConfigMap of common settings. */}}
{{- define "atlasflow.configMapName" -}}
{{- printf "%s-config" (include "atlasflow.fullname" .) -}}
{{- end -}}

{{/*
Pod annotations of an atlasflow service: the checksum of the common ConfigMap (a change rolls
the pods), Prometheus scrape hints and the component's own podAnnotations.
*/}}
{{- define "atlasflow.podAnnotations" -}}
{{- $values := index .ctx.Values .component -}}
checksum/config: {{ include (print .ctx.Template.BasePath "/configmap.yaml") .ctx | sha256sum }}
{{- if .ctx.Values.metrics.podAnnotations }}
prometheus.io/scrape: "true"
prometheus.io/port: {{ .metricsPort | quote }}
prometheus.io/path: {{ .metricsPath | default .ctx.Values.metrics.path | quote }}
{{- end }}
{{- with $values.podAnnotations }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Pod-level spec shared by every component: service account, security context, scheduling.
*/}}
{{- define "atlasflow.podSpecCommon" -}}
{{- $values := index .ctx.Values .component -}}
serviceAccountName: {{ include "atlasflow.serviceAccountName" .ctx }}
automountServiceAccountToken: false
enableServiceLinks: false
securityContext:
  {{- toYaml .ctx.Values.podSecurityContext | nindent 2 }}
terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
{{- with .ctx.Values.global.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with $values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .ctx.Values.topologySpread }}
{{- if .enabled }}
topologySpreadConstraints:
{{- range .topologyKeys }}
  - maxSkew: {{ $.ctx.Values.topologySpread.maxSkew }}
    topologyKey: {{ . }}
    whenUnsatisfiable: {{ $.ctx.Values.topologySpread.whenUnsatisfiable }}
    labelSelector:
      matchLabels:
        {{- include "atlasflow.selectorLabels" $ | nindent 8 }}
{{- end }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Hardened container security context. */}}
{{- define "atlasflow.containerSecurityContext" -}}
securityContext:
  {{- toYaml .Values.containerSecurityContext | nindent 2 }}
{{- end -}}

{{/*
Environment of every atlasflow container: Kubernetes identity through the downward API,
OpenTelemetry service name and resource attributes. Common OTEL_* settings come from the
ConfigMap (envFrom).
*/}}
{{- define "atlasflow.commonEnv" -}}
- name: K8S_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: K8S_POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: K8S_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
- name: OTEL_SERVICE_NAME
  value: atlasflow-{{ .component }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ include "atlasflow.otelResourceAttributes" . | quote }}
# Read-only root filesystem: anything that wants a home or a cache writes under /tmp.
- name: HOME
  value: /tmp
- name: XDG_CACHE_HOME
  value: /tmp/.cache
{{- end -}}

{{/* OTEL_RESOURCE_ATTRIBUTES value ($(VAR) expands the downward-API variables above). */}}
{{- define "atlasflow.otelResourceAttributes" -}}
{{- $attrs := list "service.namespace=atlasflow" (printf "service.version=%s" .ctx.Chart.AppVersion) "k8s.namespace.name=$(K8S_NAMESPACE)" "k8s.pod.name=$(K8S_POD_NAME)" "k8s.node.name=$(K8S_NODE_NAME)" -}}
{{- range $k, $v := .ctx.Values.otel.resourceAttributes -}}
{{- $attrs = append $attrs (printf "%s=%v" $k $v) -}}
{{- end -}}
{{- join "," $attrs -}}
{{- end -}}

{{/*
gRPC probes (grpc.health.v1, overall server health) of an atlasflow service (on tls.healthPort
when tls.enabled).
  (dict "ctx" $ "port" 50051)
*/}}
{{- define "atlasflow.grpcProbes" -}}
{{- $p := .ctx.Values.probes -}}
{{- /* with TLS, the plaintext health-only port: the kubelet's gRPC probe speaks no TLS */ -}}
{{- $port := ternary .ctx.Values.tls.healthPort .port .ctx.Values.tls.enabled -}}
startupProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: {{ $p.startup.periodSeconds }}
  timeoutSeconds: {{ $p.startup.timeoutSeconds }}
  failureThreshold: {{ $p.startup.failureThreshold }}
readinessProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: {{ $p.readiness.periodSeconds }}
  timeoutSeconds: {{ $p.readiness.timeoutSeconds }}
  failureThreshold: {{ $p.readiness.failureThreshold }}
livenessProbe:
  grpc:
    port: {{ $port }}
  periodSeconds: {{ $p.liveness.periodSeconds }}
  timeoutSeconds: {{ $p.liveness.timeoutSeconds }}
  failureThreshold: {{ $p.liveness.failureThreshold }}
{{- end -}}

{{/*
A PersistentVolumeClaim (rendered only when persistence is enabled and no existingClaim is set).
  (dict "ctx" $ "component" "ingest" "name" "<pvc name>" "persistence" <persistence values>)
*/}}
{{- define "atlasflow.pvc" -}}
{{- if and .persistence.enabled (not .persistence.existingClaim) }}
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: {{ .name }}
  namespace: {{ .ctx.Release.Namespace }}
  labels:
    {{- include "atlasflow.labels" . | nindent 4 }}
  {{- with .persistence.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  accessModes:
    {{- toYaml .persistence.accessModes | nindent 4 }}
  {{- /* "" -> global.storageClass -> omitted (cluster default); "-" -> "" (no dynamic provisioning) */}}
  {{- $sc := default .ctx.Values.global.storageClass .persistence.storageClass }}
  {{- if eq $sc "-" }}
  storageClassName: ""
  {{- else if $sc }}
  storageClassName: {{ $sc | quote }}
  {{- end }}
  resources:
    requests:
      storage: {{ .persistence.size | quote }}
{{- end }}
{{- end -}}

{{/*
A pod volume backed by a PVC (the existing claim or the chart's) or, with persistence
disabled, an emptyDir.
  (dict "volume" "data" "claim" "<pvc name>" "persistence" <persistence values>)
*/}}
{{- define "atlasflow.pvcVolume" -}}
- name: {{ .volume }}
{{- if .persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ default .claim .persistence.existingClaim }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end -}}

{{/* Name of the shared blobs PVC. */}}
{{- define "atlasflow.blobsClaim" -}}
{{- printf "%s-blobs" (include "atlasflow.fullname" .) -}}
{{- end -}}

{{/* Name of a component's data PVC: <fullname>-<component>-data. */}}
{{- define "atlasflow.dataClaim" -}}
{{- printf "%s-data" (include "atlasflow.componentName" .) -}}
{{- end -}}

{{/* /tmp emptyDir volume of a component. */}}
{{- define "atlasflow.tmpVolume" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .sizeLimit }}
{{- end -}}

{{/* envFrom the common ConfigMap, shared by the atlasflow service containers. */}}
{{- define "atlasflow.envFrom" -}}
envFrom:
  - configMapRef:
      name: {{ include "atlasflow.configMapName" . }}
{{- end -}}

{{/*
Ensemble versions Triton serves, as a JSON array: triton.modelRepository.ensembles, or
[segmentation.ensemble] when empty. segmentation.ensemble must be among them.
*/}}
{{- define "atlasflow.tritonEnsembles" -}}
{{- $ens := .Values.triton.modelRepository.ensembles | default (list .Values.segmentation.ensemble) -}}
{{- if not (has .Values.segmentation.ensemble $ens) -}}
{{- fail (printf "segmentation.ensemble %q is not in triton.modelRepository.ensembles %v" .Values.segmentation.ensemble $ens) -}}
{{- end -}}
{{- toJson $ens -}}
{{- end -}}

{{/* Triton model name of an ensemble version (atlasflow.segmentation.ensemble.triton_model_name). */}}
{{- define "atlasflow.tritonModelName" -}}
{{- . | replace "-" "_" | replace "." "_" -}}
{{- end -}}

{{/*
argv of the model-repository initContainer: `atlasflow triton-repo PATH --ensemble V ...
--kind gpu|cpu --instances N` (atlasflow.segmentation.triton_repo.main), as a YAML list.
*/}}
{{- define "atlasflow.tritonRepoCommand" -}}
{{- $repo := .Values.triton.modelRepository -}}
{{- $argv := list "atlasflow" "triton-repo" $repo.path -}}
{{- range (include "atlasflow.tritonEnsembles" . | fromJsonArray) -}}
{{- $argv = concat $argv (list "--ensemble" .) -}}
{{- end -}}
{{- $argv = concat $argv (list "--kind" (ternary "gpu" "cpu" (gt (int .Values.triton.gpu) 0)) "--instances" (toString (int $repo.instances))) -}}
{{- with .Values.segmentation.importedModels -}}
{{- range . -}}
{{- $argv = concat $argv (list "--member" .) -}}
{{- end -}}
{{- $argv = concat $argv (list "--models-state-dir" $.Values.segmentation.modelsRegistry.path "--load-list" (include "atlasflow.tritonLoadList" $)) -}}
{{- end -}}
{{- toYaml $argv -}}
{{- end -}}

{{/*
The file in the model repository listing the Triton models to load, one a line (`atlasflow
triton-repo --load-list`): with imported members the names carry registry digests, which the
chart cannot compute.
*/}}
{{- define "atlasflow.tritonLoadList" -}}
{{- printf "%s/.atlasflow-load-models" (trimSuffix "/" .Values.triton.modelRepository.path) -}}
{{- end -}}

{{/*
Imported ensemble members (segmentation.importedModels): checks, and the read-only mount and
volume of the model registry (segmentation.modelsRegistry) in the segmentation pods, Triton's
repository writer and (roll-out triton-repository) the training pod, which writes and loads each
promoted version with the same members. Each renders nothing without imported models.
*/}}
{{- define "atlasflow.importedModelsCheck" -}}
{{- $v := .Values.segmentation -}}
{{- if $v.importedModels -}}
{{- if not $v.modelsRegistry.existingClaim -}}
{{- fail "segmentation.importedModels needs segmentation.modelsRegistry.existingClaim: a PVC holding the model registry (the state dir `atlasflow model import --state-dir` wrote)" -}}
{{- end -}}
{{- if ne (len (uniq $v.importedModels)) (len $v.importedModels) -}}
{{- fail (printf "segmentation.importedModels lists a model twice: %v" $v.importedModels) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "atlasflow.modelsRegistryMount" -}}
{{- $r := .Values.segmentation.modelsRegistry -}}
{{- if .Values.segmentation.importedModels }}
- name: models-registry
  mountPath: {{ $r.path }}
  {{- with $r.subPath }}
  subPath: {{ . }}
  {{- end }}
  readOnly: true
{{- end -}}
{{- end -}}

{{- define "atlasflow.modelsRegistryVolume" -}}
{{- if .Values.segmentation.importedModels }}
- name: models-registry
  persistentVolumeClaim:
    claimName: {{ .Values.segmentation.modelsRegistry.existingClaim }}
    readOnly: true
{{- end -}}
{{- end -}}

{{/*
A Triton probe: an exec of the image's python3 against Triton's HTTP endpoint on loopback
(--http-address=127.0.0.1; a non-2xx answer or no answer fails it).
  (dict "port" 8000 "path" "/v2/health/ready")
*/}}
{{- define "atlasflow.tritonProbe" -}}
exec:
  command:
    - python3
    - -c
    - {{ printf "import urllib.request as u; u.build_opener(u.ProxyHandler({})).open('http://127.0.0.1:%v%s', timeout=4)" .port .path | quote }}
{{- end -}}

{{/*
How a service reaches Triton's gRPC endpoint (TRITON_TLS_* / TRITON_ALLOW_PLAINTEXT of the
segmentation and training settings): with tls.enabled, mutual TLS with the service's own
certificate (Triton requires a client certificate of the release's CA); without, plaintext,
which the service accepts to a non-loopback host only with TRITON_ALLOW_PLAINTEXT.
  (dict "ctx" $ "component" "segmentation")
*/}}
{{/*
Triton's gRPC target of segmentation and training: segmentation.tritonUrl, else this release's
headless Triton Service as a gRPC dns:/// URI, whatever triton.replicas (an autoscaler or
`kubectl scale` may add pods at any time): it resolves to one address per ready Triton pod, the
clients spread their calls over them with gRPC's round_robin policy and the roll-out loads on
each (docs/architecture.md, "Several Triton replicas").
*/}}
{{- define "atlasflow.tritonUrl" -}}
{{- if .Values.segmentation.tritonUrl -}}
{{- .Values.segmentation.tritonUrl -}}
{{- else -}}
{{- printf "dns:///%s-headless.%s.svc:%v" (include "atlasflow.componentName" (dict "ctx" . "component" "triton")) .Release.Namespace .Values.triton.ports.grpc -}}
{{- end -}}
{{- end -}}

{{- define "atlasflow.tritonClientEnv" -}}
{{- $p := printf "ATLASFLOW_%s_" (upper .component) -}}
{{- $d := include "atlasflow.tlsDir" .ctx -}}
{{- if .ctx.Values.tls.enabled -}}
# Triton: mutual TLS with this service's certificate, Triton's verified against this CA
- name: {{ $p }}TRITON_TLS_CA_FILE
  value: {{ printf "%s/ca.crt" $d | quote }}
- name: {{ $p }}TRITON_TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" $d | quote }}
- name: {{ $p }}TRITON_TLS_KEY_FILE
  value: {{ printf "%s/tls.key" $d | quote }}
{{- if not .ctx.Values.segmentation.tritonUrl }}
# Triton's certificate is checked against its Service's name (a pod address has none of its own)
- name: {{ $p }}TRITON_TLS_SERVER_NAME
  value: {{ include "atlasflow.componentName" (dict "ctx" .ctx "component" "triton") | quote }}
{{- end }}
{{- else -}}
# Triton: plaintext like the whole release (tls.enabled=false), admitted by the NetworkPolicy only
- name: {{ $p }}TRITON_ALLOW_PLAINTEXT
  value: "true"
{{- end -}}
{{- end -}}

{{/*
Authentication of an atlasflow service (docs/security.md): the token check of every RPC
(AUTH_JWKS, AUTH_ISSUER, AUTH_AUDIENCE, AUTH_ROLE_CLAIM, AUTH_ALGORITHMS) and the file of the
service's own bearer token for its calls to the other services (TOKEN_FILE). A service without
AUTH_JWKS + AUTH_ISSUER refuses to start, so the chart refuses to render without them.
  (dict "ctx" $ "component" "ingest")
*/}}
{{- define "atlasflow.authEnv" -}}
{{- $a := .ctx.Values.auth -}}
{{- $p := printf "ATLASFLOW_%s_" (upper .component) -}}
- name: {{ $p }}AUTH_ISSUER
  value: {{ required "auth.issuer is required: the OIDC issuer (iss claim) of the atlasflow tokens, e.g. https://keycloak.example/realms/radiology (docs/security.md)" $a.issuer | quote }}
- name: {{ $p }}AUTH_JWKS
  value: {{ required "auth.jwksUrl is required: the issuer's JWKS (OIDC jwks_uri), e.g. https://keycloak.example/realms/radiology/protocol/openid-connect/certs (docs/security.md)" $a.jwksUrl | quote }}
- name: {{ $p }}AUTH_AUDIENCE
  value: {{ $a.audience | quote }}
- name: {{ $p }}AUTH_ROLE_CLAIM
  value: {{ $a.roleClaim | quote }}
- name: {{ $p }}AUTH_ALGORITHMS
  value: {{ join "," $a.algorithms | quote }}
- name: {{ $p }}AUTH_SERVICE_CLAIM
  value: {{ $a.serviceClaim | default "sub" | quote }}
# The service's own token (role service), a file of the mounted Secret, re-read when it changes.
- name: {{ $p }}TOKEN_FILE
  value: {{ include "atlasflow.serviceTokenFile" .ctx | quote }}
{{- end -}}

{{/* Directory where the service-token Secret is mounted (a directory, not a subPath: the
kubelet then updates the file when the Secret changes). */}}
{{- define "atlasflow.serviceTokenDir" -}}
/var/run/secrets/atlasflow/service-token
{{- end -}}

{{/* Path of the service's bearer token file (TOKEN_FILE). */}}
{{- define "atlasflow.serviceTokenFile" -}}
{{- printf "%s/%s" (include "atlasflow.serviceTokenDir" .) .Values.auth.serviceToken.key -}}
{{- end -}}

{{/* volumeMount of the service-token Secret (read-only). */}}
{{- define "atlasflow.serviceTokenMount" -}}
- name: service-token
  mountPath: {{ include "atlasflow.serviceTokenDir" . }}
  readOnly: true
{{- end -}}

{{/* Pod volume of the service-token Secret of a component (its own identity, svc:<component>:
auth.serviceToken.secrets.<component>, else auth.serviceToken.existingSecret): only its token key,
readable by the pod's group.
  (dict "ctx" $ "component" "ingest")
*/}}
{{- define "atlasflow.serviceTokenVolume" -}}
{{- $t := .ctx.Values.auth.serviceToken -}}
{{- $name := index ($t.secrets | default dict) .component | default $t.existingSecret -}}
- name: service-token
  secret:
    secretName: {{ required (printf "auth.serviceToken.secrets.%s is not set, so auth.serviceToken.existingSecret is required: a Secret holding the %s service's own bearer token (role service, identity svc:%s) under auth.serviceToken.key (docs/security.md)" .component .component .component) $name | quote }}
    defaultMode: 0440
    items:
      - key: {{ $t.key | quote }}
        path: {{ $t.key | quote }}
{{- end -}}

{{/*
TLS of the atlasflow gRPC listeners and of their calls to each other (docs/security.md,
"Transport"). The Secret of a component: tls.secrets.<component>, else tls.existingSecret, else
(tls.certManager.enabled) <fullname>-<component>-tls written by cert-manager. Keys: tls.crt,
tls.key, ca.crt (the kubernetes.io/tls layout cert-manager writes).
  (dict "ctx" $ "component" "ingest")
*/}}
{{- define "atlasflow.tlsSecretName" -}}
{{- $t := .ctx.Values.tls -}}
{{- $own := index ($t.secrets | default dict) .component | default "" -}}
{{- if $own -}}
{{- $own -}}
{{- else if $t.existingSecret -}}
{{- $t.existingSecret -}}
{{- else if $t.certManager.enabled -}}
{{- printf "%s-tls" (include "atlasflow.componentName" .) -}}
{{- else -}}
{{- fail (printf "tls.enabled needs the certificate of %s: tls.secrets.%s, tls.existingSecret or tls.certManager.enabled (docs/security.md)" .component .component) -}}
{{- end -}}
{{- end -}}

{{/* Directory where a component's TLS Secret is mounted (a directory: the kubelet updates
the files when the Secret is renewed, and the service serves the new certificate). */}}
{{- define "atlasflow.tlsDir" -}}
/var/run/secrets/atlasflow/tls
{{- end -}}

{{/* TLS settings of an atlasflow service (tls.enabled) and the OTLP CA (otel.caSecret.name). */}}
{{- define "atlasflow.tlsEnv" -}}
{{- if .ctx.Values.tls.enabled -}}
{{- $p := printf "ATLASFLOW_%s_" (upper .component) -}}
{{- $d := include "atlasflow.tlsDir" .ctx -}}
# TLS on the gRPC listener, re-read when the mounted Secret changes
- name: {{ $p }}TLS_CERT_FILE
  value: {{ printf "%s/tls.crt" $d | quote }}
- name: {{ $p }}TLS_KEY_FILE
  value: {{ printf "%s/tls.key" $d | quote }}
{{- if .ctx.Values.tls.mutual }}
# mutual TLS: clients need a certificate of this CA
- name: {{ $p }}TLS_CLIENT_CA_FILE
  value: {{ printf "%s/ca.crt" $d | quote }}
{{- end }}
# calls to the other services: TLS, verified against this CA, with this certificate
- name: {{ $p }}TLS_CA_FILE
  value: {{ printf "%s/ca.crt" $d | quote }}
# the kubelet's gRPC probes cannot speak TLS: grpc.health.v1 alone, plaintext, on this port
- name: {{ $p }}HEALTH_PORT
  value: {{ .ctx.Values.tls.healthPort | quote }}
{{- end }}
{{- with .ctx.Values.otel.caSecret.name }}
# OTLP over TLS: the collector's certificate is verified against this CA bundle
- name: OTEL_EXPORTER_OTLP_CERTIFICATE
  value: {{ printf "/var/run/secrets/atlasflow/otel-ca/%s" $.ctx.Values.otel.caSecret.key | quote }}
{{- end -}}
{{- end -}}

{{/* containerPort of the plaintext health-only listener (tls.enabled only). */}}
{{- define "atlasflow.tlsHealthPort" -}}
{{- if .Values.tls.enabled -}}
- name: health
  containerPort: {{ .Values.tls.healthPort }}
  protocol: TCP
{{- end -}}
{{- end -}}

{{/* volumeMounts of a component's TLS Secret (tls.enabled) and of the OTLP CA (otel.caSecret.name). */}}
{{- define "atlasflow.tlsMount" -}}
{{- if .Values.tls.enabled -}}
- name: tls
  mountPath: {{ include "atlasflow.tlsDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.otel.caSecret.name }}
- name: otel-ca
  mountPath: /var/run/secrets/atlasflow/otel-ca
  readOnly: true
{{- end -}}
{{- end -}}

{{/* Pod volumes of a component's TLS Secret (tls.enabled) and of the OTLP CA (otel.caSecret.name). */}}
{{- define "atlasflow.tlsVolume" -}}
{{- if .ctx.Values.tls.enabled -}}
- name: tls
  secret:
    secretName: {{ include "atlasflow.tlsSecretName" . | quote }}
    defaultMode: 0440
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
      - key: ca.crt
        path: ca.crt
{{- end }}
{{- with .ctx.Values.otel.caSecret }}
{{- if .name }}
- name: otel-ca
  secret:
    secretName: {{ .name | quote }}
    defaultMode: 0444
    items:
      - key: {{ .key | quote }}
        path: {{ .key | quote }}
{{- end }}
{{- end -}}
{{- end -}}

{{/* The gateway's OIDC redirect URI: gateway.oidc.redirectUri, else
https://<gateway.ingress.host>/login/oidc/callback. */}}
{{- define "atlasflow.gatewayRedirectUri" -}}
{{- $v := .Values.gateway -}}
{{- if $v.oidc.redirectUri -}}
{{- $v.oidc.redirectUri -}}
{{- else -}}
{{- printf "https://%s/login/oidc/callback" (required "gateway.oidc.redirectUri or gateway.ingress.host is required: the OIDC redirect URI registered at the provider" $v.ingress.host) -}}
{{- end -}}
{{- end -}}

{{/*
The shared blob store of a component (common/blobstore.py): blobs.url s3://... sets BLOB_URL and
the S3 settings (no volume); "" sets BLOB_DIR to the blob volume.
  (dict "ctx" $ "component" "ingest")
*/}}
{{- define "atlasflow.blobEnv" -}}
{{- $b := .ctx.Values.blobs -}}
{{- $p := printf "ATLASFLOW_%s_" (upper .component) -}}
{{- if $b.url }}
- name: {{ $p }}BLOB_URL
  value: {{ $b.url | quote }}
- name: {{ $p }}BLOB_S3_ENDPOINT_URL
  value: {{ $b.s3.endpointUrl | quote }}
- name: {{ $p }}BLOB_S3_REGION
  value: {{ $b.s3.region | quote }}
- name: {{ $p }}BLOB_S3_ADDRESSING_STYLE
  value: {{ $b.s3.addressingStyle | quote }}
{{- if $b.s3.credentials.existingSecret }}
# boto3's standard chain reads the mounted credentials file (never a value in the environment)
- name: AWS_SHARED_CREDENTIALS_FILE
  value: {{ printf "%s/%s" (include "atlasflow.s3CredentialsDir" .ctx) $b.s3.credentials.key | quote }}
{{- end }}
{{- else }}
- name: {{ $p }}BLOB_DIR
  value: {{ $b.mountPath | quote }}
{{- end }}
{{- end -}}

{{- define "atlasflow.s3CredentialsDir" -}}
/var/run/secrets/atlasflow/s3
{{- end -}}

{{/* volumeMounts of the blob store: the blob volume (local), or the S3 credentials file. */}}
{{- define "atlasflow.blobMount" -}}
{{- $b := .Values.blobs -}}
{{- if not $b.url }}
- name: blobs
  mountPath: {{ $b.mountPath }}
{{- else if $b.s3.credentials.existingSecret }}
- name: s3-credentials
  mountPath: {{ include "atlasflow.s3CredentialsDir" . }}
  readOnly: true
{{- end }}
{{- end -}}

{{/* Pod volumes of the blob store: the shared PVC (local), or the S3 credentials Secret. */}}
{{- define "atlasflow.blobVolume" -}}
{{- $b := .Values.blobs -}}
{{- if not $b.url }}
{{- include "atlasflow.pvcVolume" (dict "volume" "blobs" "claim" (include "atlasflow.blobsClaim" .) "persistence" $b.persistence) }}
{{- else if $b.s3.credentials.existingSecret }}
- name: s3-credentials
  secret:
    secretName: {{ $b.s3.credentials.existingSecret | quote }}
    defaultMode: 0440
    items:
      - key: {{ $b.s3.credentials.key | quote }}
        path: {{ $b.s3.credentials.key | quote }}
{{- end }}
{{- end -}}

{{/*
The training service's roll-out of a promoted version (ATLASFLOW_TRAINING_ROLLOUT, docs/training.md
"The chart: roll-out"): training.rollout.mode, "auto" resolved to "triton-repository" when the
release's Triton has a model repository on a ReadWriteMany PVC that training can write, else
"pointer". "pointer" also when training is off. Used by the training and segmentation
Deployments and the NetworkPolicies, so that the env and the policies agree.
*/}}
{{- define "atlasflow.trainingRollout" -}}
{{- $t := .Values.training -}}
{{- $p := .Values.triton.modelRepository.persistence -}}
{{- if not $t.enabled -}}
pointer
{{- else if eq $t.rollout.mode "auto" -}}
{{- ternary "triton-repository" "pointer" (and .Values.triton.enabled $p.enabled (has "ReadWriteMany" $p.accessModes) $t.persistence.enabled) -}}
{{- else -}}
{{- $t.rollout.mode -}}
{{- end -}}
{{- end -}}

{{/*
The PostgreSQL Secret of a component, "<secret>/<key>", or "" (the embedded SQLite):
<component>.database.existingSecret under <component>.database.secretKey; else, with
postgresql.enabled (the in-cluster PostgreSQL for trials), postgresql.auth.existingSecret under
<component>-database-url; the gateway's audit log falls back to labels' (one audit_log table keeps
each service's records apart). Neither a Secret name nor a key can hold "/".
  (dict "ctx" $ "component" "ingest")
*/}}
{{- define "atlasflow.databaseSecret" -}}
{{- $v := index .ctx.Values .component -}}
{{- $pg := .ctx.Values.postgresql | default dict -}}
{{- if $v.database.existingSecret -}}
{{- printf "%s/%s" $v.database.existingSecret $v.database.secretKey -}}
{{- else if eq .component "gateway" -}}
{{- include "atlasflow.databaseSecret" (dict "ctx" .ctx "component" "labels") -}}
{{- else if $pg.enabled -}}
{{- printf "%s/%s-database-url" (include "atlasflow.postgresqlSecret" .ctx) .component -}}
{{- end -}}
{{- end -}}

{{/* Directory where a component's database Secret is mounted (DATABASE_URL_FILE is in it). */}}
{{- define "atlasflow.databaseDir" -}}
/var/run/secrets/atlasflow/database
{{- end -}}

{{/*
DATABASE_URL_FILE of a component with a PostgreSQL Secret (atlasflow.databaseSecret): the URL
is a file of the mounted Secret, read once at start (common/settings.py), never an environment
value of the pod spec. Nothing without a Secret (SQLite on the data volume).
  (dict "ctx" $ "component" "ingest")
*/}}
{{- define "atlasflow.databaseEnv" -}}
{{- if include "atlasflow.databaseSecret" . -}}
# PostgreSQL: the URL (postgresql://...) is a file of the mounted Secret, never an env value
- name: {{ printf "ATLASFLOW_%s_DATABASE_URL_FILE" (upper .component) }}
  value: {{ printf "%s/database-url" (include "atlasflow.databaseDir" .ctx) | quote }}
{{- end -}}
{{- end -}}

{{/* volumeMount of a component's database Secret (read-only), if it has one. */}}
{{- define "atlasflow.databaseMount" -}}
{{- if include "atlasflow.databaseSecret" . -}}
- name: database-url
  mountPath: {{ include "atlasflow.databaseDir" .ctx }}
  readOnly: true
{{- end -}}
{{- end -}}

{{/*
Pod volume of a component's database Secret: only its URL key, as the file database-url,
mode 0400. The kubelet gives a read-only Secret volume's files to the pod's fsGroup with group
read (0440, root:fsGroup), so the service's user (podSecurityContext: fsGroup = runAsGroup)
reads it and nobody else in the pod's other groups does.
*/}}
{{- define "atlasflow.databaseVolume" -}}
{{- with include "atlasflow.databaseSecret" . -}}
{{- $ref := splitList "/" . -}}
- name: database-url
  projected:
    defaultMode: 0400
    sources:
      - secret:
          name: {{ index $ref 0 | quote }}
          items:
            - key: {{ index $ref 1 | quote }}
              path: database-url
{{- end -}}
{{- end -}}

{{/* Name of the Secret of the in-cluster PostgreSQL (postgresql.auth.existingSecret), required. */}}
{{- define "atlasflow.postgresqlSecret" -}}
{{- required "postgresql.auth.existingSecret is required with postgresql.enabled: an existing Secret holding the PostgreSQL password (key password) and each service's URL (keys ingest-database-url, segmentation-database-url, ranking-database-url, labels-database-url, training-database-url; deploy/README.md \"PostgreSQL for trials\"). The chart never generates it, so nothing changes across helm template/upgrade" .Values.postgresql.auth.existingSecret -}}
{{- end -}}
