{{/*
Name of the release's objects: the release name, or "<release>-sluice" when the release
name does not contain "sluice". Objects append "-operator" and the like.
*/}}
{{- define "sluice.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "sluice.operatorName" -}}
{{- printf "%s-operator" (include "sluice.fullname" .) -}}
{{- end -}}

{{- define "sluice.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "sluice.labels" -}}
{{ include "sluice.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "sluice.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "sluice.operatorName" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "sluice.subject" -}}
- kind: ServiceAccount
  name: {{ include "sluice.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end -}}

{{- define "sluice.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "sluice.gatewayImage" -}}
{{- default (include "sluice.image" .) .Values.gatewayImage -}}
{{- end -}}

{{/*
What the operator reads and writes, resource by resource; README "What the operator may
do" explains each rule, and tests/chart_installs.rs checks against an audit log that the
operator uses every one of them. Never a wildcard.

Cluster-scoped resources: always granted by the ClusterRole.
*/}}
{{- define "sluice.clusterRules" -}}
# Policies select servers by namespace labels; namespaces are watched for label changes.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [get, list, watch]
# Is there a node in the server's region (metadata only)?
- apiGroups: [""]
  resources: [nodes]
  verbs: [list]
# The region of the volume bound to a server's claim.
- apiGroups: [""]
  resources: [persistentvolumes]
  verbs: [get]
# The region a StorageClass provisions in; watched, so a class created after its
# servers is judged.
- apiGroups: [storage.k8s.io]
  resources: [storageclasses]
  verbs: [get, list, watch]
- apiGroups: [sluice.dev]
  resources: [dataresidencypolicies]
  verbs: [list, watch]
- apiGroups: [sluice.dev]
  resources: [dataresidencypolicies/status]
  verbs: [patch]
{{- end -}}

{{/*
Namespaced resources: granted cluster-wide by the ClusterRole, or by a Role in each of
watchNamespaces. Owned objects are written with server-side apply (patch); applying an
object that does not exist yet creates it, which the API server authorises as create.
*/}}
{{- define "sluice.namespacedRules" -}}
- apiGroups: [sluice.dev]
  resources: [transferservers]
  verbs: [get, list, watch]
# Gateway objects carry the server as owner with blockOwnerDeletion, which clusters with
# the OwnerReferencesPermissionEnforcement admission plugin (OpenShift) allow only to
# those who may update the owner's finalizers.
- apiGroups: [sluice.dev]
  resources: [transferservers/finalizers]
  verbs: [update]
- apiGroups: [sluice.dev]
  resources: [transferusers]
  verbs: [list, watch]
- apiGroups: [sluice.dev]
  resources: [transferservers/status, transferusers/status]
  verbs: [patch]
# Host keys (created once, never overwritten), the gateway configuration (applied), and
# the password, TLS and object-store Secrets servers and users refer to (read, watched).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get, list, watch, create, patch]
# The server's Service and per-pod FTPS Services; per-pod ones no longer needed are deleted.
- apiGroups: [""]
  resources: [services]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [""]
  resources: [persistentvolumeclaims]
  verbs: [get, list, watch, create, patch]
- apiGroups: [apps]
  resources: [statefulsets]
  verbs: [get, list, watch, create, patch]
# The gateway Deployment of releases before the StatefulSet is removed when found.
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, delete]
- apiGroups: [networking.k8s.io]
  resources: [networkpolicies]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [policy]
  resources: [poddisruptionbudgets]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create]
{{- end -}}
