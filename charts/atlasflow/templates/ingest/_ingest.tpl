{{/*
"true" when ingest runs as a StatefulSet of replicas on PostgreSQL (ingest.database names a
Secret, or the in-cluster postgresql.enabled), "" when it runs as the single-replica Deployment
on SQLite. Used by the workload, its volume, its Services and the HorizontalPodAutoscaler
(hpa.yaml); values.schema.json's root allOf refuses ingest.replicas > 1 in the SQLite case.
*/}}
{{- define "atlasflow.ingestStateful" -}}
{{- $pg := .Values.postgresql | default dict -}}
{{- if or .Values.ingest.database.existingSecret $pg.enabled -}}true{{- end -}}
{{- end -}}
