package link

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"time"

	mqtt "github.com/eclipse/paho.mqtt.golang"
)

// NotifyTopic is where the server tells this device to check in.
func (l *Link) NotifyTopic() string { return "fp/dev/" + l.Bundle.DeviceID + "/notify" }

// ListenMQTT connects to the server's MQTT broker (mqtts://host:port) with
// the device's certificate, subscribes to its notifications, and calls
// wake for each one. It reconnects by itself (and subscribes again) until
// ctx ends; while it is down the agent simply polls. It returns when ctx
// ends, or at once for a bad broker address.
func (l *Link) ListenMQTT(ctx context.Context, broker string, wake func()) error {
	u, err := url.Parse(broker)
	if err != nil || u.Scheme != "mqtts" || u.Host == "" || u.Port() == "" {
		return fmt.Errorf("mqtt broker %q: want mqtts://HOST:PORT", broker)
	}
	tc := l.tlsConfig.Clone()
	tc.NextProtos = nil
	topic := l.NotifyTopic()
	opts := mqtt.NewClientOptions().
		AddBroker("tls://" + u.Host).
		SetClientID(l.Bundle.DeviceID).
		SetTLSConfig(tc).
		SetCleanSession(true).
		SetKeepAlive(60 * time.Second).
		SetConnectTimeout(15 * time.Second).
		SetAutoReconnect(true).
		SetConnectRetry(true).
		SetConnectRetryInterval(5 * time.Second).
		SetMaxReconnectInterval(2 * time.Minute).
		SetOnConnectHandler(func(c mqtt.Client) {
			// Subscribed anew on every connection (a clean session
			// forgets it); a notification missed while down is not
			// lost: the next poll finds the offer.
			c.Subscribe(topic, 1, func(mqtt.Client, mqtt.Message) { wake() })
			l.logf("mqtt: connected to %s, listening on %s", u.Host, topic)
		}).
		SetConnectionLostHandler(func(_ mqtt.Client, err error) {
			l.logf("mqtt: connection lost (%v): polling until it is back", err)
		})
	c := mqtt.NewClient(opts)
	tok := c.Connect() // with ConnectRetry it keeps trying in the background
	defer c.Disconnect(250)
	select {
	case <-ctx.Done():
		return nil
	case <-tok.Done():
		if err := tok.Error(); err != nil && !errors.Is(err, context.Canceled) {
			l.logf("mqtt: %v", err)
		}
	}
	<-ctx.Done()
	return nil
}
