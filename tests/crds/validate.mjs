// Validates Kubernetes custom resources against their CRDs' schemas, with the generated
// models of kubernetes-models (npm: @kubernetes-models/keda, .../prometheus-operator).
// Reads a JSON array of documents on stdin; writes a JSON array: for each, null when it
// is valid, else the validator's message. tests/unit/test_crds.py installs and runs it.
import { ScaledObject } from "@kubernetes-models/keda/keda.sh/v1alpha1";
import {
  PodMonitor,
  PrometheusRule,
  ServiceMonitor,
} from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";

const MODELS = {
  "keda.sh/v1alpha1/ScaledObject": ScaledObject,
  "monitoring.coreos.com/v1/PodMonitor": PodMonitor,
  "monitoring.coreos.com/v1/ServiceMonitor": ServiceMonitor,
  "monitoring.coreos.com/v1/PrometheusRule": PrometheusRule,
};

let input = "";
for await (const chunk of process.stdin) input += chunk;
const verdicts = JSON.parse(input).map((document) => {
  const Model = MODELS[`${document.apiVersion}/${document.kind}`];
  if (!Model) return `no schema here for ${document.apiVersion} ${document.kind}`;
  try {
    new Model(document).validate();
    return null;
  } catch (error) {
    return error.message;
  }
});
process.stdout.write(JSON.stringify(verdicts));
