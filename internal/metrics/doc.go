// Package metrics keeps counters, gauges and histograms and serves them in the Prometheus text
// exposition format, version 0.0.4, the format every Prometheus server scrapes.
//
// It is written here rather than taken from prometheus/client_golang because the hook and the
// broker are one binary, and the hook runs on nix-daemon's critical path for every build: the
// client library would add 2.6 MiB to it and a few milliseconds of package initialisation to
// every hook process, for metrics only the broker serves. This package has no init work and
// covers what the broker needs, no more.
//
// # Use
//
// Metrics are registered once, at start-up, and updated from anywhere:
//
//	reg := metrics.NewRegistry()
//	builds := reg.Counter("nix_offload_builds_total", "Builds finished, by machine and outcome.", "machine", "outcome")
//	upload := reg.Histogram("nix_offload_upload_seconds", "Time to copy a build's inputs.", nil)
//	reg.GaugeFunc("nix_offload_slots_used", "Builds running on each machine.", func() []metrics.Sample {
//		return []metrics.Sample{{Labels: []string{"root@b1:22"}, Value: 3}}
//	}, "machine")
//	http.Handle("/metrics", reg.Handler())
//
//	builds.With("root@b1:22", "success").Inc()
//	upload.With().Observe(1.7)
//
// With looks the series up in a map; code that updates one series often can keep the
// *Counter it returns. Updates of counters and gauges are atomic operations; a histogram
// takes a mutex of its own. A GaugeFunc is called at each scrape, for values that are cheaper
// to read when asked than to keep up to date, such as the slots in use per machine.
//
// # Exposition
//
// [Registry.WriteText] writes each metric family, sorted by name, as
//
//	# HELP nix_offload_builds_total Builds finished, by machine and outcome.
//	# TYPE nix_offload_builds_total counter
//	nix_offload_builds_total{machine="root@b1:22",outcome="success"} 12
//
// with its series sorted by label values. A histogram has, for each series, one cumulative
// _bucket line per upper bound (label le) ending with le="+Inf", then _sum and _count. In
// label values a backslash, a double quote and a newline are escaped as \\, \" and \n; in
// help texts, the backslash and the newline. Numbers are written as Prometheus reads them:
// integers exactly and without exponent (up to 2^53), other values in the shortest form that
// reads back the same, and +Inf, -Inf, NaN. A family with no series yet is left out.
//
// Label values must be UTF-8; invalid bytes are replaced with U+FFFD when a series is made.
//
// # Mistakes panic
//
// Mistakes in the program, as opposed to in its data, panic at once, so that they show up in
// the first test run:
//
//   - registering a name twice, or a name that a histogram's _bucket, _sum or _count series
//     already use (or would use);
//   - a metric name not matching [a-zA-Z_:][a-zA-Z0-9_:]*, a label name not matching
//     [a-zA-Z_][a-zA-Z0-9_]*, a label name starting with "__", the same label name twice,
//     or a histogram label named "le";
//   - histogram bounds that are not increasing, or not numbers;
//   - With called with the wrong number of label values;
//   - a counter made to go down, or added NaN.
//
// A GaugeFunc's samples are data of the moment, so WriteText reports bad ones (the wrong
// number of label values, two samples with the same labels) as an error and leaves them out,
// and the handler answers 500.
package metrics
