{{/*
The in-cluster PostgreSQL for trials (postgresql.enabled; NOT for production: one pod, no
replication, no backups). Its credentials come from the EXISTING Secret
postgresql.auth.existingSecret (atlasflow.postgresqlSecret): the chart generates nothing, so a
`helm template` / `helm upgrade` renders the same objects every time.
*/}}

{{/* Host name of the trial PostgreSQL's Service (the host of the URLs in the Secret). */}}
{{- define "atlasflow.postgresqlHost" -}}
{{- include "atlasflow.componentName" (dict "ctx" . "component" "postgresql") -}}
{{- end -}}

{{/* Directory of the mounted password file (POSTGRES_PASSWORD_FILE). */}}
{{- define "atlasflow.postgresqlSecretDir" -}}
/var/run/secrets/atlasflow/postgresql
{{- end -}}
